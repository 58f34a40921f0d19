#!/usr/bin/env bash
# check-docs.sh: what `mkdocs build --strict` (mkdocs 1.4) does not check.
#  - every page of docs/ is in mkdocs.yml's nav (1.4 only logs one that is not);
#  - every relative link of README.md resolves to a file or directory of the
#    checkout, and its #anchor, if any, to a heading of that page;
#  - every #anchor of a link between docs/ pages names a heading of its page
#    (1.4 does not look at anchors).
# Headings become anchors as Python-Markdown's toc makes them, which for our
# headings is also what GitHub makes. Run from anywhere; `make docs` runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 - <<'EOF'
import os, re, sys, unicodedata
import yaml

errors = []

def slug(text):
    text = re.sub(r'`([^`]*)`', r'\1', text)
    text = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', text)
    text = unicodedata.normalize('NFKD', text).encode('ascii', 'ignore').decode('ascii')
    text = re.sub(r'[^\w\s-]', '', text).strip().lower()
    return re.sub(r'[-\s]+', '-', text)

def anchors(path):
    out, fence = set(), False
    for line in open(path, encoding='utf-8'):
        if line.startswith('```'):
            fence = not fence
        elif not fence:
            m = re.match(r'#{1,6}\s+(.*?)\s*#*\s*$', line)
            if m:
                out.add(slug(m.group(1)))
    return out

LINK = re.compile(r'\]\(([^)\s]+)\)')

def links(path):
    fence = False
    for n, line in enumerate(open(path, encoding='utf-8'), 1):
        if line.startswith('```'):
            fence = not fence
            continue
        if fence:
            continue
        for m in LINK.finditer(re.sub(r'`[^`]*`', '', line)):
            yield n, m.group(1)

def check(page, n, target):
    if re.match(r'^[a-z]+:', target):
        return
    base, _, frag = target.partition('#')
    dest = os.path.normpath(os.path.join(os.path.dirname(page), base)) if base else page
    if not os.path.exists(dest):
        errors.append(f'{page}:{n}: link {target}: {dest} does not exist')
        return
    if frag and dest.endswith('.md') and frag not in anchors(dest):
        errors.append(f'{page}:{n}: link {target}: no heading of {dest} makes the anchor #{frag}')

def nav_pages(nav):
    for item in nav:
        for v in (item.values() if isinstance(item, dict) else [item]):
            if isinstance(v, list):
                yield from nav_pages(v)
            else:
                yield v

cfg = yaml.safe_load(open('mkdocs.yml'))
in_nav = set(nav_pages(cfg.get('nav', [])))
pages = sorted(f for f in os.listdir('docs') if f.endswith('.md'))
for p in pages:
    if p not in in_nav:
        errors.append(f'docs/{p}: not in the nav of mkdocs.yml; add it there')
for p in sorted(in_nav):
    if not os.path.exists(os.path.join('docs', p)):
        errors.append(f'mkdocs.yml: nav names {p}, which is not in docs/')

for n, target in links('README.md'):
    check('README.md', n, target)
for p in pages:
    for n, target in links(os.path.join('docs', p)):
        if not re.match(r'^[a-z]+:', target) and '#' in target:
            check(os.path.join('docs', p), n, target)

for e in errors:
    print('check-docs: ' + e, file=sys.stderr)
if errors:
    sys.exit(1)
print(f'check-docs: {len(pages)} pages in the nav, README.md links and docs anchors resolve')
EOF
