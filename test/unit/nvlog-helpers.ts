/** Shared by the NVRAM log's unit tests (nvlog.test.ts, nvlog-native.test.ts). */
import type { NvLog } from '../../src/nvlog/log';

const BS = 4096;

/** Resolves an lbn through the log only (undefined = not logged). */
export function logged(log: NvLog, lbn: number): Buffer | 'zero' | undefined {
  const hit = log.resolver(lbn, lbn + 1)(lbn);
  if (!hit) return undefined;
  if (hit.kind === 'zero') return 'zero';
  const out = Buffer.alloc(BS);
  log.copyBlock(hit.regionOffset, out, 0);
  return out;
}
