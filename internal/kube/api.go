package kube

import (
	"context"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
)

// API is what the controller needs of the Kubernetes API server: pods
// listed and watched (the informer's ListerWatcher), and events posted.
// Client talks to a real API server; tests drive the controller through
// client-go's fake clientset.
type API interface {
	ListPods(ctx context.Context, opts metav1.ListOptions) (*PodList, error)
	WatchPods(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error)
	CreateEvent(ctx context.Context, ev *Event) error
}

// Pod is the part of a core/v1 Pod nsredirect reads, decoded from the API
// server's JSON. k8s.io/api/core/v1 would add 3 MB to the binary for fields
// never looked at.
type Pod struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              PodSpec   `json:"spec,omitempty"`
	Status            PodStatus `json:"status,omitempty"`
}

// PodSpec holds the fields of a pod's spec nsredirect reads.
type PodSpec struct {
	NodeName    string `json:"nodeName,omitempty"`
	HostNetwork bool   `json:"hostNetwork,omitempty"`
}

// PodStatus holds the fields of a pod's status nsredirect reads.
type PodStatus struct {
	Phase string `json:"phase,omitempty"`
}

// PodRunning is the phase of a pod whose sandbox runs.
const PodRunning = "Running"

// DeepCopyObject implements runtime.Object for the informer's cache.
func (p *Pod) DeepCopyObject() runtime.Object {
	if p == nil {
		return nil
	}
	out := &Pod{TypeMeta: p.TypeMeta, Spec: p.Spec, Status: p.Status}
	p.ObjectMeta.DeepCopyInto(&out.ObjectMeta)
	return out
}

// PodList is a list of pods, with the resource version a watch starts at.
type PodList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []Pod `json:"items"`
}

// DeepCopyObject implements runtime.Object.
func (l *PodList) DeepCopyObject() runtime.Object {
	if l == nil {
		return nil
	}
	out := &PodList{TypeMeta: l.TypeMeta}
	l.ListMeta.DeepCopyInto(&out.ListMeta)
	out.Items = make([]Pod, len(l.Items))
	for i := range l.Items {
		out.Items[i] = *l.Items[i].DeepCopyObject().(*Pod)
	}
	return out
}

// Event is a core/v1 Event about a pod, as posted.
type Event struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	InvolvedObject    ObjectReference `json:"involvedObject"`
	Reason            string          `json:"reason"`
	Message           string          `json:"message"`
	Type              string          `json:"type"`
	Source            EventSource     `json:"source"`
	FirstTimestamp    metav1.Time     `json:"firstTimestamp"`
	LastTimestamp     metav1.Time     `json:"lastTimestamp"`
	Count             int32           `json:"count"`
}

// DeepCopyObject implements runtime.Object, for the REST client's encoder.
func (e *Event) DeepCopyObject() runtime.Object {
	if e == nil {
		return nil
	}
	out := *e
	e.ObjectMeta.DeepCopyInto(&out.ObjectMeta)
	e.FirstTimestamp.DeepCopyInto(&out.FirstTimestamp)
	e.LastTimestamp.DeepCopyInto(&out.LastTimestamp)
	return &out
}

// EventList is a core/v1 EventList, as listed.
type EventList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata"`
	Items           []Event `json:"items"`
}

// DeepCopyObject implements runtime.Object, for the REST client's decoder.
func (l *EventList) DeepCopyObject() runtime.Object {
	if l == nil {
		return nil
	}
	out := &EventList{TypeMeta: l.TypeMeta}
	l.ListMeta.DeepCopyInto(&out.ListMeta)
	out.Items = make([]Event, len(l.Items))
	for i := range l.Items {
		out.Items[i] = *l.Items[i].DeepCopyObject().(*Event)
	}
	return out
}

// ObjectReference names the pod an event is about.
type ObjectReference struct {
	Kind            string `json:"kind"`
	APIVersion      string `json:"apiVersion"`
	Namespace       string `json:"namespace"`
	Name            string `json:"name"`
	UID             string `json:"uid"`
	ResourceVersion string `json:"resourceVersion,omitempty"`
}

// EventSource says who posted an event.
type EventSource struct {
	Component string `json:"component"`
	Host      string `json:"host,omitempty"`
}

// Event types.
const (
	EventWarning = "Warning"
	EventNormal  = "Normal"
)
