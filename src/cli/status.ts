/**
 * `nvmirror status DIR [--json]`, a health view like `zpool status`: who serves the volume
 * (pid, URIs, exports, clients), size and space, CPs, NVRAM fill, snapshots, the sections
 * added beside the engine (mirror), and an `errors:` line with the reads refused since the
 * serving process opened the volume. `--json` prints the same VolumeStatus.
 */
import { Command } from 'commander';
import * as fs from 'fs';
import * as path from 'path';
import { volumeDirStatus } from '../volume/dir-ops';
import { LABEL_NAME } from '../volume/label';
import { volumeDirInUse } from '../volume/dir-lock';
import { type VolumeStatus } from '../volume/served';
import { controlRequest } from '../volume/engine-control';
import { RECEIVER_SOCKET_NAME, type ReceiverStats } from '../mirror/receiver';
import { SOURCE_UUID_RE, isReceiveDir, sourceEntryNames } from '../mirror/receive-dir';
import type { MirrorSourceStats } from '../mirror/source';
import { standingLine } from '../mirror/standing';
import { MIRROR_STATE_NAME, readRelationship, relationshipProblem } from '../mirror/relationship';
import { readRole, type RoleRecord } from '../mirror/role';
import { MEMBER_NAME, MIRROR_LABEL_NAME, mirrorDirSummary, readMirrorLabel, type MirrorDirSummary, type MirrorLabel } from '../mirror/mirror-dir';
import { formatSize } from '../util/size';
import type { RaidHealth } from '../raid/raid-device';
import { journalPendingText } from '../raid/journal-file';
import type { ScrubState } from '../raid/scrub';

function when(ms: number): string {
  return ms > 0 ? new Date(ms).toISOString() : 'never';
}

/** A volume that was a mirror and was promoted says so, and from which CP. */
function formatRole(r: RoleRecord | undefined): string[] {
  if (!r) return [];
  return [`role       primary: promoted from a mirror at ${new Date(r.promotedMs).toISOString()}, from CP ${r.promotedFromCp} (kept as snapshot ${r.baseSnapshot}); ${r.recordsReplayed} log record(s) replayed, last seq ${r.lastSeq}`];
}

export function formatStatus(s: VolumeStatus & { role?: RoleRecord & { state: 'promoted' }; mirrorRecorded?: RecordedMirror }): string {
  const snaps = s.snapshots.length === 0 ? 'none' : s.snapshots.map((x) => `${x.name} (CP ${x.cpNumber})`).join(', ');
  return [
    `volume     ${s.dir}`,
    `uuid       ${s.uuid}`,
    ...formatRole(s.role),
    `size       ${formatSize(s.sizeBytes)}, ${formatSize(s.usedBytes)} used on a ${formatSize(s.deviceBytes)} ${s.raid ? 'RAID device' : 'member'}`,
    ...(s.raid ? formatRaid(s.raid) : []),
    ...formatServed(s),
    `CPs        ${s.cpNumber}, last at ${when(s.lastCpMs)} took ${s.lastCpDurationMs} ms`,
    ...(s.lastCp ? [formatCpPhases(s.lastCp)] : []),
    `NVRAM      ${formatSize(s.nvram.sizeBytes)}, ${s.nvram.fillPercent}% full (${formatSize(s.nvram.usedBytes)})` +
      (s.nvram.unreplayedRecords > 0 ? `, ${s.nvram.unreplayedRecords} records to replay at next open` : ''),
    `snapshots  ${snaps}`,
    ...(s.sections?.mirror ? formatMirror(s.sections.mirror as MirrorSourceStats) : []),
    ...(s.mirrorRecorded ? [formatRecordedMirror(s.mirrorRecorded)] : []),
    formatErrors(s),
  ].join('\n');
}

/** The last CP's blocks and phases on one line, like ZFS's per-txg times. */
export function formatCpPhases(c: NonNullable<VolumeStatus['lastCp']>): string {
  const p = c.phases;
  const ms = (v: number): string => String(Math.round(v));
  const early = c.earlyBlocks ? ` (${c.earlyBlocks} of them placed before the CP)` : '';
  return `           CP ${c.cpNumber}: ${c.dataBlocks} data${early} + ${c.blocksWritten - c.dataBlocks} other blocks written, ${c.blocksFreed} freed; ` +
    `prepare ${ms(p.prepareMs)}, address ${ms(p.addressMs)}, data ${ms(p.dataMs)}, space map ${ms(p.spaceMapMs)}, sync ${ms(p.syncMs)}, superblock ${ms(p.superblockMs)}` +
    `${p.sinkMs > 0 ? `, mirror ${ms(p.sinkMs)}` : ''} ms`;
}

/** The RAID section, like `zpool status`'s config table: state, then one row per member with its read/write/checksum counts. */
export function formatRaid(r: RaidHealth & { scrub?: ScrubState }): string[] {
  const lost = r.memberStatus.filter((m) => m.state !== 'online');
  const state = r.state === 'failed' ? 'FAILED' : r.state === 'degraded' ? 'DEGRADED' : 'ONLINE';
  const lines = [
    `raid       RAID-${r.level}, ${r.members} members, stripe unit ${formatSize(r.stripeUnitBytes)}: ${state}` +
      (r.state === 'online' ? '' : `, ${lost.length} of ${r.members} members out of service (tolerates ${r.tolerance})`),
  ];
  if (r.failure) lines.push(`           ${r.failure}`);
  const run = r.scrub?.running;
  if (run) {
    const pct = run.totalBytes > 0 ? Math.min(100, Math.round((100 * run.scannedBytes) / run.totalBytes)) : 0;
    lines.push(`scan       scrub${run.repair ? ' (repair)' : ''} in progress since ${new Date(run.startedMs).toISOString()}: ${run.phase}, ${formatSize(run.scannedBytes)} of ~${formatSize(run.totalBytes)} scanned (${pct}%)`);
  } else if (r.scrub?.last) {
    const l = r.scrub.last;
    lines.push(`scan       scrub${l.repair ? ' repaired' : ' found'} ${l.repair ? l.corrected : l.checksumErrors + l.parityErrors} error(s) in ${(l.durationMs / 1000).toFixed(1)} s with ${l.uncorrectable} uncorrectable, ${new Date(l.startedMs + l.durationMs).toISOString()}`);
  }
  const rb = r.rebuild;
  if (rb) {
    const pct = rb.totalBytes > 0 ? Math.min(100, Math.round((100 * rb.doneBytes) / rb.totalBytes)) : 100;
    lines.push(`rebuild    member ${rb.index} ${rb.old} -> ${rb.new} in progress since ${new Date(rb.startedMs).toISOString()}: ${formatSize(rb.doneBytes)} of ${formatSize(rb.totalBytes)} (${pct}%, ${rb.stripesDone} of ${rb.stripesTotal} stripes)` +
      `, ${formatSize(rb.bytesPerSec)}/s${rb.etaSeconds !== undefined ? `, ETA ${rb.etaSeconds} s` : ''}${rb.rateBytesPerSec !== undefined ? `, limit ${formatSize(rb.rateBytesPerSec)}/s` : ''}${rb.resumedAtStripe > 0 ? `, resumed at stripe ${rb.resumedAtStripe}` : ''}`);
  }
  if (r.stripeWrites.full + r.stripeWrites.readModifyWrite > 0) {
    lines.push(`           stripes written since open: ${r.stripeWrites.full} whole, ${r.stripeWrites.readModifyWrite} by read-modify-write` +
      (r.journal && r.journal.stripes > 0 ? ` (${r.journal.stripes} through the stripe journal in ${r.journal.batches} batches)` : ''));
  }
  if (r.journal && r.journal.replayedStripes > 0) lines.push(`           ${r.journal.replayedStripes} stripes of an interrupted write replayed from the stripe journal at open`);
  if (r.journalPending) lines.push(`           ${journalPendingText(r.journalPending)}`);
  const width = Math.max(6, ...r.memberStatus.map((m) => m.name.length));
  lines.push(`           ${'member'.padEnd(width + 4)} ${'STATE'.padEnd(10)} ${'READ'.padStart(5)} ${'WRITE'.padStart(5)} ${'CKSUM'.padStart(5)} ${'HEALED'.padStart(6)}`);
  for (const m of r.memberStatus) {
    const e = m.errors;
    lines.push(`           ${`${m.index}  ${m.name}`.padEnd(width + 4)} ${m.state.toUpperCase().padEnd(10)} ${String(e.read).padStart(5)} ${String(e.write).padStart(5)} ${String(e.checksum).padStart(5)} ${String(e.healed).padStart(6)}` +
      (m.reason ? `  ${m.reason}` : ''));
  }
  return lines;
}

function formatServed(s: VolumeStatus): string[] {
  if (!s.served) return ['served     no'];
  const srv = s.server;
  const lines = [`served     yes${s.readOnly ? ' (read-only)' : ''}${srv ? `, by pid ${srv.pid}` : ''}`];
  for (const u of srv?.uris ?? []) lines.push(`           ${u}`);
  if (srv?.exports) lines.push(`exports    ${srv.exports.length > 0 ? srv.exports.map((e) => (e === '' ? '"" (the default)' : e)).join(', ') : 'none'}`);
  if (srv?.clients !== undefined) lines.push(`clients    ${srv.clients} connected`);
  if ((srv?.logDroppedLines ?? 0) > 0) lines.push(`log        ${srv!.logDroppedLines} line(s) dropped: the server's stderr was not read fast enough`);
  return lines;
}

/** The `errors:` line: reads refused since open (a served volume), as zpool status says it. */
export function formatErrors(s: VolumeStatus): string {
  const e = s.errors;
  if (s.cpFailure !== undefined) {
    const full = s.cpFailureCode === 'ENOSPC';
    return `errors:    WRITES FAILING: ${s.cpFailure}; the volume takes no writes (they fail with ${s.cpFailureCode ?? 'EIO'}) until it is restarted. ` +
      `Every acknowledged write is kept in the NVRAM log and replayed at the restart${full ? ': free space on the members\' file system first' : ''}`;
  }
  const since = s.served ? 'since the volume was opened' : 'by this status (not served: `nvmirror check` reads every block)';
  const repaired = (e.repaired ?? 0) > 0 ? `; ${e.repaired} block(s) failed verification here and were repaired from the mirror (the log names them: look at this disk)` : '';
  if (e.checksum === 0 && e.io === 0) return `errors:    No known data errors ${since.startsWith('since') ? '' : `(${since})`}`.trimEnd() + repaired;
  return `errors:    ${e.checksum} checksum error(s), ${e.io} I/O error(s) ${since}: reads refused with EIO (the log names the blocks; run \`nvmirror check\`)${repaired}`;
}

function ratio(wire: number, client: number): string {
  return client > 0 ? `${(wire / client).toFixed(2)}x` : '-';
}

export function formatMirror(m: MirrorSourceStats): string[] {
  const lines = [
    `mirror     ${m.mode} to ${m.peer} (${m.policy}): ${m.state}${m.connected || m.state === 'disconnected' ? '' : ', not connected'}`,
    `           CP ${m.sourceCp} here, CP ${m.destCp} there (${m.rootsEqual ? 'roots equal' : `${m.lagCps} CPs behind`})` + (m.lagSeconds > 0 ? `, behind for ${m.lagSeconds} s` : '') +
      `, ${formatSize(m.lagBytes)} not yet there, link ${formatSize(m.wireBytesPerSec)}/s`,
    `           ${formatSize(m.bytesOnWire)} on the wire for ${formatSize(m.clientBytes)} written (${ratio(m.bytesOnWire, m.clientBytes)}${m.catchUpWireBytes > 0 ? `, ${formatSize(m.catchUpWireBytes)} of it while baselines and resyncs ran` : ''}); CP blocks as references ${m.refsSent} (${formatSize(m.bytesSavedByRefs)} saved), as deltas ${m.deltasSent}, as data ${m.dataBlocksSent}${m.cpsAbandoned > 0 ? `; ${m.cpsAbandoned} CPs abandoned for a slow peer (resynced)` : ''}`,
  ];
  if (m.resync) {
    const r = m.resync;
    const of = r.totalBytes ? ` of ~${formatSize(r.totalBytes)} (${Math.min(100, Math.round((100 * r.blocksSent * 4096) / r.totalBytes))}%)` : '';
    const eta = r.etaSeconds !== undefined ? `, ETA ${r.etaSeconds} s` : '';
    const limit = m.rateLimitBytesPerSec !== undefined ? `, limit ${formatSize(m.rateLimitBytesPerSec)}/s` : '';
    lines.push(`           ${r.baseCp < 0 ? 'baseline' : `resync from CP ${r.baseCp}`} to CP ${r.targetCp}: ${formatSize(r.blocksSent * 4096)}${of} sent, ${formatSize(r.bytesPerSec)}/s${limit}${eta}`);
  }
  if (m.readerPinnedCp >= 0 && m.readerPinnedCp < m.destCp) lines.push(`           CP ${m.readerPinnedCp} held here too: a reader of the mirror is on it`);
  if (m.standing) lines.push(`           ${standingLine(m.standing, 'source')}`);
  if (m.lastError && m.state !== 'in-sync') lines.push(`           last error: ${m.lastError}`);
  return lines;
}

/** A receive directory's other entries: promoted mirrors (primaries now) and demoted old primaries waiting for failback. */
export interface ReceiveDirEntry {
  uuid: string;
  dir: string;
  role: 'promoted' | 'demoted' | 'mirror';
  /** promoted: the CP it was promoted from; demoted: its own newest CP when demoted; mirror: its committed CP (-1: none yet). */
  cp: number;
  /** mirror: the committed root pointer (hex), as a running receiver reports it. */
  root?: string;
  /** mirror: an interrupted full baseline (the image is inconsistent until it completes). */
  baselinePartial?: boolean;
  detail: string;
}

export async function receiveDirEntries(dir: string, open: ReadonlySet<string>, running: boolean): Promise<ReceiveDirEntry[]> {
  const out: ReceiveDirEntry[] = [];
  for (const uuid of sourceEntryNames(dir)) {
    const d = path.join(dir, uuid);
    const role = readRole(d);
    if (role) {
      const served = await volumeDirInUse(d).catch(() => false);
      out.push({ uuid, dir: d, role: 'promoted', cp: role.promotedFromCp, detail: `promoted ${new Date(role.promotedMs).toISOString()}: a primary volume now (${served ? 'served' : `serve ${d}`}), promoted from CP ${role.promotedFromCp}` });
      continue;
    }
    if (open.has(uuid)) continue;
    if (!fs.existsSync(path.join(d, MIRROR_LABEL_NAME))) {
      // A mirror's member without its label (the source's next connection makes it again from the member); anything else is not a mirror.
      if (fs.existsSync(path.join(d, MEMBER_NAME))) out.push({ uuid, dir: d, role: 'mirror', cp: -1, detail: `DAMAGED: ${MIRROR_LABEL_NAME} is missing beside ${MEMBER_NAME}: the source's next connection makes it again if the member holds its committed CPs (else a new mirror)` });
      continue;
    }
    let ml: MirrorLabel;
    try {
      ml = readMirrorLabel(d);
    } catch (e) {
      out.push({ uuid, dir: d, role: 'mirror', cp: -1, detail: `DAMAGED: ${e instanceof Error ? e.message : String(e)}` });
      continue;
    }
    if (ml.demoted) {
      out.push({ uuid, dir: d, role: 'demoted', cp: ml.demoted.cp, detail: `demoted ${ml.demoted.fromDir} (its CP ${ml.demoted.cp}): waiting for the other side of the failover to connect and resync it from the CP both hold (failback)` });
      continue;
    }
    let sum: MirrorDirSummary;
    try {
      sum = await mirrorDirSummary(d, ml);
    } catch (e) {
      out.push({ uuid, dir: d, role: 'mirror', cp: -1, detail: `a mirror whose member cannot be read: ${e instanceof Error ? e.message : String(e)} (check it with nvmirror check)` });
      continue;
    }
    const image = sum.baselinePartial ? 'INCONSISTENT (a full baseline was interrupted; it resumes when the source connects)'
      : sum.cp < 0 ? 'no CP committed yet' : `CP ${sum.cp} committed`;
    out.push({ uuid, dir: d, role: 'mirror', cp: sum.cp, root: sum.root, baselinePartial: sum.baselinePartial,
      detail: `${image}; ${running ? 'its source has not connected since this receiver started' : 'check it with nvmirror check'}` });
  }
  return out;
}

export function formatReceiver(dir: string, r: ReceiverStats & { directories?: ReceiveDirEntry[] }): string {
  // A connection is a source only once its stream is taken (one in its handshake, or being refused, is not).
  const streaming = r.mirrors.filter((m) => m.connected).length;
  const others = r.connections - streaming;
  const lines = [`receiver   ${dir}, ${streaming} source(s) connected${others > 0 ? `, ${others} other connection(s) (in a handshake, or refused)` : ''}`];
  if (r.memory) lines.push(`memory     ${formatSize(r.memory.usedBytes)} of ${formatSize(r.memory.budgetBytes)} budget in use (peak ${formatSize(r.memory.peakBytes)})${r.memory.waiting > 0 ? `, ${r.memory.waiting} waiting` : ''}`);
  for (const m of r.mirrors) {
    lines.push(
      `mirror     ${m.sourceUuid}: ${m.baselinePartial ? 'INCONSISTENT (baseline in progress)' : `CP ${m.committedCp}`}, ${m.connected ? 'source connected' : 'source not connected'}`,
      `           ${m.cpsApplied} CPs applied, ${m.blocksApplied} blocks as data, ${m.refsApplied} from the log, ${m.deltasApplied} rebuilt from deltas; log ${formatSize(m.logUsedBytes)} (${m.recordsStored} records stored, ${m.recordsDropped} dropped)${m.droppingFromSeq > 0 ? `; FULL: dropping records from seq ${m.droppingFromSeq} until a CP covers them` : ''}`,
    );
    if (m.blocksServedFromSource > 0) {
      const left = m.blocksServedFromSource - (m.blocksHealed ?? 0);
      lines.push(`           ${m.blocksServedFromSource} block(s) of this mirror failed verification and were served from the source's copy, ${m.blocksHealed ?? 0} rewritten here` +
        (left > 0 ? `; ${left} not (read on an older CP): \`nvmirror check\` this mirror` : ' (the log names the pbas: look at this disk)'));
    }
    if (m.snapshots?.length) lines.push(`           snapshots ${m.snapshots.map((x) => `${x.name} (CP ${x.cp})`).join(', ')}: exported as ${m.snapshots.map((x) => `${m.sourceUuid}@${x.name}`).join(', ')}`);
    if (m.catchUp) lines.push(`           ${m.catchUp.baseCp < 0 ? 'baseline' : `resync from CP ${m.catchUp.baseCp}`} to CP ${m.catchUp.cp} in progress: ${m.catchUp.blocks} blocks (${formatSize(m.catchUp.blocks * 4096)}) received`);
    const st = r.standings?.find((x) => x.sourceUuid === m.sourceUuid);
    if (st) lines.push(`           ${standingLine(st, 'destination')}`);
    if (m.lastError) lines.push(`           last error: ${m.lastError}`);
    if (m.readers > 0) lines.push(`           ${m.readers} reader(s) of the export; the oldest on CP ${m.oldestPinnedCp} (the source holds it), the longest for ${Math.round(m.longestPinMs / 1000)} s`);
    if (m.readersReleased > 0) lines.push(`           ${m.readersReleased} reader(s) of older CPs released: a CP wrote blocks their CP used (the source did not hold it)`);
    if (m.raid) lines.push(...formatRaid(m.raid));
  }
  for (const e of r.directories ?? []) {
    lines.push(`${e.role.padEnd(10)} ${e.uuid}: ${e.detail}`);
    const st = r.standings?.find((x) => x.sourceUuid === e.uuid);
    if (st) lines.push(`           its old source connected: ${standingLine(st, 'destination')}`);
  }
  return lines.join('\n');
}

/** A stopped source's recorded relationship (mirror-source.json), for status. */
interface RecordedMirror {
  running: false;
  /** The volume is served, without it (--no-mirror, or read-only). */
  served?: boolean;
  peer?: string;
  mode?: string;
  policy?: string;
  rateBytesPerSec?: number;
  /** The destination's CP whose blocks this volume holds (-1: none; serving takes a baseline). */
  destCp?: number;
  pinnedCp?: number;
  problem?: string;
}

function recordedMirror(dir: string): RecordedMirror | undefined {
  const problem = relationshipProblem(dir);
  if (problem !== undefined) return { running: false, problem: `${MIRROR_STATE_NAME}: ${problem}` };
  const r = readRelationship(dir);
  if (!r) return undefined;
  return {
    running: false, peer: r.peer, mode: r.mode, policy: r.policy, destCp: r.destCp,
    ...(r.rateBytesPerSec !== undefined ? { rateBytesPerSec: r.rateBytesPerSec } : {}),
    ...(r.pinnedCp !== undefined ? { pinnedCp: r.pinnedCp } : {}),
  };
}

function formatRecordedMirror(m: RecordedMirror): string {
  if (m.problem !== undefined) return `mirror     ${m.problem}`;
  const rate = m.rateBytesPerSec !== undefined ? `, limit ${formatSize(m.rateBytesPerSec)}/s` : '';
  return [
    `mirror     ${m.mode} to ${m.peer} (${m.policy}${rate}): not running (recorded; ${m.served ? 'served without it: a serve without --no-mirror resumes it' : 'serving the volume resumes it'})`,
    (m.destCp ?? -1) >= 0
      ? `           the destination's CP ${m.destCp} is held here${m.pinnedCp !== undefined ? ` (and CP ${m.pinnedCp}, a reader's)` : ''}: serving resyncs from it, no baseline`
      : '           no CP of the destination is held here: serving starts with a baseline',
  ].join('\n');
}

/**
 * A receive directory's status: from its running receiver (control socket), else from
 * its directories; `only`: one mirror's (RECEIVE_DIR/<only>). Undefined when DIR is not a
 * receive directory (no receiver answers, no mirror in it, no receiver.lock).
 */
async function receiveDirStatus(dir: string, only: string | undefined): Promise<(ReceiverStats & { running: boolean; directories: ReceiveDirEntry[] }) | undefined> {
  const keep = <T>(xs: T[], uuid: (x: T) => string): T[] => (only === undefined ? xs : xs.filter((x) => uuid(x) === only));
  const rxSock = path.join(dir, RECEIVER_SOCKET_NAME);
  if (fs.existsSync(rxSock)) {
    // A socket a killed receiver left behind answers nothing: then the directories speak.
    const r = await controlRequest(rxSock, { op: 'status' }, 10_000).catch(() => undefined);
    if (r && !r.ok) throw new Error(`receiver: ${r.error}`);
    if (r) {
      const rx = r.receiver as ReceiverStats;
      const directories = await receiveDirEntries(dir, new Set(rx.mirrors.map((m) => m.sourceUuid)), true);
      return {
        ...rx, running: true,
        mirrors: keep(rx.mirrors, (m) => m.sourceUuid),
        ...(rx.standings ? { standings: keep(rx.standings, (x) => x.sourceUuid) } : {}),
        directories: keep(directories, (e) => e.uuid),
      };
    }
  }
  const entries = keep(await receiveDirEntries(dir, new Set(), false), (e) => e.uuid);
  // A receive directory: mirrors in it, or the lock a receiver took (none received yet).
  if (entries.length > 0 || (only === undefined && isReceiveDir(dir))) {
    return { connections: 0, mirrors: [], running: false, directories: entries };
  }
  return undefined;
}

export function registerStatus(program: Command): void {
  program
    .command('status')
    .description('show a volume directory\'s health: who serves it (pid, URIs, exports, clients), errors since open, size, space used, snapshots, CPs, NVRAM fill, its mirror; or a receive directory\'s mirrors')
    .argument('<DIR>', 'the volume directory, a receive directory, or one of its mirrors (RECEIVE_DIR/<source-uuid>)')
    .option('--json', 'print JSON')
    .action(async (dir: string, o: { json?: boolean }) => {
      const abs = path.resolve(dir);
      if (!fs.existsSync(path.join(abs, LABEL_NAME))) {
        // A mirror (RECEIVE_DIR/<source-uuid>) shows its receive directory's status, for it alone.
        const only = fs.existsSync(path.join(abs, MIRROR_LABEL_NAME)) && SOURCE_UUID_RE.test(path.basename(abs)) ? path.basename(abs) : undefined;
        const rxDir = only !== undefined ? path.dirname(abs) : abs;
        const st = await receiveDirStatus(rxDir, only);
        if (st) {
          const text = formatReceiver(rxDir, st);
          process.stdout.write(o.json ? `${JSON.stringify(st, null, 2)}\n` : `${st.running ? text : text.replace(/, 0 source\(s\) connected$/m, ': no receiver running')}\n`);
          return;
        }
      }
      const role = readRole(abs);
      const s = { ...(await volumeDirStatus(dir)), ...(role ? { role: { ...role, state: 'promoted' as const } } : {}) };
      // Not served: the mirror relationship it records (serve resumes it), or what is wrong with it.
      const rec = s.sections?.mirror ? undefined : recordedMirror(abs);
      const recorded = rec && s.served ? { ...rec, served: true } : rec;
      const out = recorded ? { ...s, mirrorRecorded: recorded } : s;
      process.stdout.write(o.json ? `${JSON.stringify(out, null, 2)}\n` : `${formatStatus(out)}\n`);
    });
}
