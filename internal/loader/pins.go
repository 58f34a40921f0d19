package loader

import (
	"fmt"
	"os"
	"path/filepath"
)

// Pin directory layout (version 3). Everything of ours lives here and
// nothing else does.
//
//	v3/nsr_rules v3/nsr_counters v3/nsr_peers v3/nsr_sockets   maps the programs use
//	v3/nsr_stats v3/nsr_udp_peers
//	v3/nsr_records                                            enrollments, userspace only
//	prog_connect4 ... prog_sock_release                       programs, for bpftool
//	link_connect4 ... link_sock_release                       bpf_links at the cgroup2 root
//	owners/<cookie>/                                          flocked by the live owner of a netns
//
// The maps live in a directory named after the layout version, so a build
// whose maps differ finds the older layout and migrates it (migrate.go);
// links, programs and owner locks do not depend on the layout. Version 2 is
// version 3 without nsr_peers (and the sock_release program that empties
// it): records of redirected sockets were all in socket storage. Version 1
// is the layout before versioning: the maps of version 2 but nsr_udp_peers
// at the top, nsr_enroll instead of nsr_records. The pin directory itself
// is flocked: exclusively while state changes, shared while it is read.
const (
	layoutVersion = 3
	ownersDir     = "owners"
	recordsMap    = "nsr_records"
	// v1EnrollMap is where version 1 kept its enrollment records.
	v1EnrollMap = "nsr_enroll"
)

// pins builds every pin path of a pin directory: the only place that does.
type pins struct{ dir string }

// stateDir holds the maps of the current layout.
func (p pins) stateDir() string { return filepath.Join(p.dir, fmt.Sprintf("v%d", layoutVersion)) }

// v2Dir holds the maps of layout version 2; v2StagingDir is where a build
// of layout 2 staged its migration from version 1 (one that crashed leaves
// it).
func (p pins) v2Dir() string        { return filepath.Join(p.dir, "v2") }
func (p pins) v2StagingDir() string { return filepath.Join(p.dir, "tmp_v2") }

// stagingDir is where a migration builds the next state dir before renaming
// it into place (bpffs refuses dots in names).
func (p pins) stagingDir() string { return filepath.Join(p.dir, fmt.Sprintf("tmp_v%d", layoutVersion)) }

// mapIn is the pin of map name under a state dir.
func (p pins) mapIn(stateDir, name string) string { return filepath.Join(stateDir, name) }

// mapPath is the pin of map name in the current layout.
func (p pins) mapPath(name string) string { return p.mapIn(p.stateDir(), name) }

func (p pins) link(h hook) string { return filepath.Join(p.dir, "link_"+h.name) }

func (p pins) prog(h hook) string { return filepath.Join(p.dir, "prog_"+h.name) }

// v1Map is the pin of map name in layout version 1.
func (p pins) v1Map(name string) string { return filepath.Join(p.dir, name) }

// v1Maps are the maps of layout version 1.
var v1Maps = []string{"nsr_rules", "nsr_counters", "nsr_sockets", v1EnrollMap}

func (p pins) owners() string { return OwnersDir(p.dir) }

func (p pins) owner(cookie uint64) string { return filepath.Join(p.owners(), fmt.Sprint(cookie)) }

// RecordsMap is the name of the enrollment record map (records.go), pinned
// beside the programs' maps.
const RecordsMap = recordsMap

// MapPin is where map name (nsr_rules, nsr_counters, nsr_sockets, nsr_stats,
// nsr_records) of the current layout is pinned under pin dir dir, for tools
// and tests that read the kernel state from outside.
func MapPin(dir, name string) string { return pins{dir}.mapPath(name) }

// pinAtomically pins obj under a temporary name and renames it into place,
// so a crash never leaves a half-made pin at the real path and a replaced
// program is swapped in one step.
func pinAtomically(obj interface{ Pin(string) error }, path string) error {
	// bpffs refuses names with dots.
	tmp := filepath.Join(filepath.Dir(path), "tmp_"+filepath.Base(path))
	_ = os.Remove(tmp)
	if err := obj.Pin(tmp); err != nil {
		return fmt.Errorf("pin %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("pin %s: %w", path, err)
	}
	return nil
}
