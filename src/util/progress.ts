/**
 * One progress line on a terminal (`\r`-rewritten, at most every PROGRESS_INTERVAL_MS),
 * and the same figures for `status`. Writes nothing when the stream is not a TTY, so
 * logs and pipes stay clean.
 */
import { formatSize } from './size';

const PROGRESS_INTERVAL_MS = 250;

export interface ProgressFigures {
  doneBytes: number;
  /** Estimated total, if known. */
  totalBytes: number | undefined;
  bytesPerSec: number;
  etaSeconds: number | undefined;
}

export class ProgressLine {
  private readonly t0 = Date.now();
  private lastDrawMs = 0;
  private drawn = false;
  private done = 0;

  constructor(private readonly what: string, private totalBytes: number | undefined, private readonly stream: NodeJS.WriteStream = process.stderr) {}

  figures(): ProgressFigures {
    const s = Math.max(0.001, (Date.now() - this.t0) / 1000);
    const rate = this.done / s;
    const eta = this.totalBytes !== undefined && rate > 0 ? Math.max(0, Math.round((this.totalBytes - this.done) / rate)) : undefined;
    return { doneBytes: this.done, totalBytes: this.totalBytes, bytesPerSec: Math.round(rate), etaSeconds: eta };
  }

  /** The total, once known (counted beside the work). */
  setTotal(totalBytes: number): void {
    this.totalBytes = totalBytes;
  }

  update(doneBytes: number): void {
    this.done = doneBytes;
    const now = Date.now();
    if (!this.stream.isTTY || now - this.lastDrawMs < PROGRESS_INTERVAL_MS) return;
    this.lastDrawMs = now;
    this.draw();
  }

  private draw(): void {
    const f = this.figures();
    const pct = f.totalBytes ? ` (${Math.min(100, Math.round((100 * f.doneBytes) / f.totalBytes))}%)` : '';
    const of = f.totalBytes ? ` of ~${formatSize(f.totalBytes)}` : '';
    const eta = f.etaSeconds !== undefined ? `, ETA ${f.etaSeconds} s` : '';
    this.stream.write(`\r\x1b[K${this.what}: ${formatSize(f.doneBytes)}${of}${pct}, ${formatSize(f.bytesPerSec)}/s${eta}`);
    this.drawn = true;
  }

  /** Ends the line (a final state on a terminal). */
  finish(): void {
    if (!this.stream.isTTY) return;
    if (this.drawn || this.done > 0) {
      this.draw();
      this.stream.write('\n');
    }
  }
}
