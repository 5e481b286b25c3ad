/**
 * The README's Layout section is the rule for src/'s imports, checked here against every
 * import in src/ (type-only ones too: a type in the wrong folder is how layers start to run
 * back up):
 * - a folder on the data path (the list before "Beside the data path:") imports only
 *   folders listed below it, never a folder beside the data path (src/cli/, the top,
 *   excepted: it wires everything);
 * - a folder beside the data path imports data-path folders other than src/cli/, and
 *   beside folders listed after it.
 * A new folder must be listed there before anything imports it.
 */
import { strict as assert } from 'assert';
import * as fs from 'fs';
import * as path from 'path';

const ROOT = path.join(__dirname, '..', '..', '..');
const SRC = path.join(ROOT, 'src');

interface Layout {
  dataPath: string[];
  beside: string[];
}

function readLayout(): Layout {
  const readme = fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8');
  const at = readme.indexOf('\n## Layout');
  assert.ok(at >= 0, 'README has a Layout section');
  const section = readme.slice(at, readme.indexOf('\n## ', at + 1));
  const layout: Layout = { dataPath: [], beside: [] };
  let list = layout.dataPath;
  for (const line of section.split('\n')) {
    if (line.startsWith('Beside the data path:')) list = layout.beside;
    const m = /^src\/([a-z]+)\/\s/.exec(line);
    if (m) list.push(m[1]!);
  }
  return layout;
}

function sourceFiles(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = path.join(dir, e.name);
    return e.isDirectory() ? sourceFiles(p) : e.name.endsWith('.ts') ? [p] : [];
  });
}

/** Every (file, imported folder) pair of src/: imports and re-exports of '../<folder>/...'. */
function crossFolderImports(): Array<{ file: string; from: string; to: string }> {
  const out: Array<{ file: string; from: string; to: string }> = [];
  for (const file of sourceFiles(SRC)) {
    const rel = path.relative(SRC, file);
    const from = rel.split(path.sep)[0]!;
    const text = fs.readFileSync(file, 'utf8');
    for (const m of text.matchAll(/(?:from|import)\s*\(?\s*'\.\.\/([a-z]+)\//g)) out.push({ file: rel, from, to: m[1]! });
  }
  return out;
}

/** The rule's answer for one import: undefined if allowed, else why not. */
export function layerProblem(layout: Layout, from: string, to: string): string | undefined {
  const d = layout.dataPath;
  const b = layout.beside;
  if (!d.includes(from) && !b.includes(from)) return `src/${from}/ is not in the README's Layout`;
  if (!d.includes(to) && !b.includes(to)) return `src/${to}/ is not in the README's Layout`;
  if (from === 'cli') return undefined;
  if (to === 'cli') return 'nothing imports src/cli/';
  if (d.includes(from)) {
    if (b.includes(to)) return `src/${from}/ is on the data path, src/${to}/ beside it`;
    return d.indexOf(to) > d.indexOf(from) ? undefined : `src/${to}/ is above src/${from}/ on the data path`;
  }
  if (d.includes(to)) return undefined;
  return b.indexOf(to) > b.indexOf(from) ? undefined : `src/${to}/ is listed before src/${from}/ beside the data path`;
}

describe('layers: src/ imports follow the README Layout', () => {
  const layout = readLayout();

  it('the README lists the data path and the folders beside it, and every folder of src/', () => {
    assert.deepEqual(layout.dataPath.slice(0, 1), ['cli']);
    assert.equal(layout.dataPath[layout.dataPath.length - 1], 'util');
    assert.ok(layout.beside.includes('mirror'));
    const folders = fs.readdirSync(SRC, { withFileTypes: true }).filter((e) => e.isDirectory()).map((e) => e.name).sort();
    assert.deepEqual([...layout.dataPath, ...layout.beside].sort(), folders);
  });

  it('the rule refuses an import back up, into a folder beside, or into cli', () => {
    const l: Layout = { dataPath: ['cli', 'volume', 'tree', 'util'], beside: ['mirror', 'metrics'] };
    assert.equal(layerProblem(l, 'volume', 'tree'), undefined);
    assert.equal(layerProblem(l, 'cli', 'mirror'), undefined);
    assert.equal(layerProblem(l, 'mirror', 'metrics'), undefined);
    assert.equal(layerProblem(l, 'mirror', 'volume'), undefined);
    assert.match(layerProblem(l, 'tree', 'volume')!, /above/);
    assert.match(layerProblem(l, 'util', 'tree')!, /above/);
    assert.match(layerProblem(l, 'tree', 'mirror')!, /beside/);
    assert.match(layerProblem(l, 'metrics', 'mirror')!, /listed before/);
    assert.match(layerProblem(l, 'mirror', 'cli')!, /nothing imports/);
    assert.match(layerProblem(l, 'raid', 'util')!, /not in the README/);
  });

  it('no import in src/ breaks it', () => {
    const imports = crossFolderImports();
    assert.ok(imports.length > 300, `found ${imports.length} cross-folder imports: the scan is broken`);
    const bad = imports
      .filter((i) => i.from !== i.to)
      .map((i) => ({ ...i, why: layerProblem(layout, i.from, i.to) }))
      .filter((i) => i.why !== undefined)
      .map((i) => `src/${i.file} imports src/${i.to}/: ${i.why}`);
    assert.deepEqual(bad, []);
  });
});
