/**
 * `nvmirror attach (--memory SIZE | --file PATH | DIR) /dev/nbdN`: serve a volume to the
 * local kernel as /dev/nbdN, in the foreground, until SIGINT/SIGTERM or a detach.
 * Parsing and wiring only; the work is in src/attach/.
 */
import * as path from 'path';
import { Command, InvalidArgumentError, Option } from 'commander';
import { attachVolume } from '../attach/attach';
import { keepBaseWithoutMirror } from '../mirror/base-hold';
import { readRelationship } from '../mirror/relationship';
import { BLOCK_SIZES_BYTES, MAX_CONNECTIONS, MAX_TIMEOUT_S, AttachMethod } from '../attach/kernel';
import { createLogger } from '../util/log';
import { formatSize } from '../util/size';
import { durationArg, intArg, logLevelArg, onStopSignals, sizeArg, volumeSpecFromArgs } from './common';

interface AttachCliOpts {
  memory?: number;
  file?: string;
  export: string;
  readOnly?: boolean;
  blockSize: number;
  connections: number;
  timeout: number;
  interface: AttachMethod;
  cpInterval?: number;
  logLevel: string;
  /** false with --no-mirror. */
  mirror: boolean;
}

function blockSizeArg(value: string): number {
  const n = Number(value);
  if (!(BLOCK_SIZES_BYTES as readonly number[]).includes(n)) throw new InvalidArgumentError(`expected one of ${BLOCK_SIZES_BYTES.join(', ')}, got "${value}"`);
  return n;
}

export function registerAttach(program: Command): void {
  program
    .command('attach')
    .description('serve a volume to this machine\'s kernel as /dev/nbdN (needs root and the nbd driver: modprobe nbd)')
    .usage('[options] (--memory SIZE | --file PATH | DIR) /dev/nbdN')
    .argument('<DIR_OR_DEVICE>', 'a volume directory, then the device; or just the device with --memory/--file')
    .argument('[DEVICE]', 'the device, /dev/nbdN')
    .option('--memory <SIZE>', 'attach a sparse in-memory volume of SIZE (K/M/G/T suffixes)', sizeArg)
    .option('--file <PATH>', 'attach a raw image file')
    .option('--export <NAME>', 'export name (shown in logs)', '')
    .option('--read-only', 'attach read-only')
    .option('--block-size <BYTES>', `logical block size of the device: ${BLOCK_SIZES_BYTES.join(', ')}`, blockSizeArg, 512)
    .option('--connections <N>', 'number of connections (sockets) to the kernel', intArg(1, MAX_CONNECTIONS), 1)
    .option('--timeout <S>', 'seconds before the kernel fails a request that got no reply (and drops the connection)', intArg(1, MAX_TIMEOUT_S), 30)
    .addOption(new Option('--interface <WHICH>', 'kernel interface').choices(['auto', 'netlink', 'ioctl']).default('auto'))
    .option('--no-mirror', 'attach a mirrored volume directory without its mirror (its CP stays held: the mirror resumes with a resync)')
    .option('--cp-interval <DURATION>', 'consistency point interval for volume directories, e.g. 10s, 500ms (a bare number is ms)', durationArg(10, 3_600_000, 'ms'))
    .addOption(new Option('--log-level <LEVEL>', 'log level').default('info').argParser(logLevelArg))
    .action(async (first: string, second: string | undefined, o: AttachCliOpts) => {
      await attach(second === undefined ? undefined : first, second ?? first, o);
    });
}

async function attach(dir: string | undefined, device: string, o: AttachCliOpts): Promise<void> {
  const given = [o.memory !== undefined, o.file !== undefined, dir !== undefined].filter(Boolean).length;
  if (given !== 1) throw new Error('give exactly one of --memory SIZE, --file PATH or a volume directory, then the device (/dev/nbdN)');
  const spec = volumeSpecFromArgs(dir, o);
  const logger = createLogger(o.logLevel);
  if (dir !== undefined && !spec.readOnly) {
    // attach does not run the mirror: attaching a mirrored volume silently would drop its
    // guarantees (strict: RPO 0) while it is written.
    const rel = o.mirror ? readRelationship(path.resolve(dir)) : undefined;
    if (rel) {
      throw new Error(`${path.resolve(dir)} is mirrored to ${rel.peer} (${rel.mode}, ${rel.policy}), and attach does not run the mirror: give --no-mirror to attach it without (its mirror's CP stays held, so the mirror resumes with a resync when served again), or serve it with its mirror (nvmirror serve ${dir} --socket PATH) and attach that with nbd-client`);
    }
    // A mirrored volume attached without its mirror: the destination's CP stays held.
    const keep = keepBaseWithoutMirror(path.resolve(dir), logger);
    if (keep) spec.beforeRecovery = keep;
  }
  const a = await attachVolume({
    spec,
    device,
    blockSizeBytes: o.blockSize,
    connections: o.connections,
    timeoutS: o.timeout,
    method: o.interface,
    logger,
  });
  const v = a.opened.volume;
  process.stdout.write(
    [
      `nvmirror: ${device} attached: ${a.opened.what} (${formatSize(v.sizeBytes)}${v.caps.readOnly ? ', read-only' : ''}), ` +
        `block size ${o.blockSize}, ${o.connections} connection${o.connections > 1 ? 's' : ''}, via ${a.method}`,
      `detach with Ctrl-C here, or: nvmirror detach ${device}`,
    ].join('\n') + '\n',
  );
  onStopSignals(() => a.stop(), logger);
  const { by } = await a.ended;
  if (by === 'detach') process.stdout.write(`nvmirror: ${device} was detached\n`);
  if (by === 'lost') {
    process.stderr.write(`nvmirror: lost the connections to the kernel for ${device}; detached it\n`);
    process.exit(1);
  }
  process.exit(0);
}
