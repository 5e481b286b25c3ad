/**
 * A test playing one end of the mirror protocol on a real loopback socket: it frames
 * what it sends (FrameWriter) and parses what it gets (FrameParser) into `got`. Used
 * against `receive` in the process (mirror-hello-race, mirror-dropped-ref).
 */
import { strict as assert } from 'assert';
import * as net from 'net';
import { FrameParser, FrameWriter, type Message, type OutMessage } from '../../src/mirror/wire';

export interface RawPeer {
  /** Every message received so far, in order. */
  got: Message[];
  /** Resolves when the connection is closed (by either end). */
  closed: Promise<void>;
  send: (m: OutMessage) => void;
  /** Writes bytes as they are (a frame cut short, garbage). */
  raw: (b: Buffer) => void;
  destroy: () => void;
}

export async function rawPeer(port: number): Promise<RawPeer> {
  const fw = new FrameWriter();
  const fp = new FrameParser();
  const got: Message[] = [];
  const s = net.connect(port, '127.0.0.1');
  await new Promise<void>((res, rej) => s.once('connect', res).once('error', rej));
  s.on('data', (d: Buffer) => got.push(...fp.push(d)));
  s.on('error', () => undefined);
  const closed = new Promise<void>((res) => s.once('close', () => res()));
  const send = (m: OutMessage): void => {
    for (const part of fw.frame(m)) s.write(part);
  };
  return { got, closed, send, raw: (b) => void s.write(b), destroy: () => s.destroy() };
}

/** Polls `f` every 10 ms until it holds; fails the test naming `what` after `ms`. */
export async function until(what: string, f: () => boolean, ms = 5000): Promise<void> {
  for (const t0 = Date.now(); !f(); await new Promise((r) => setTimeout(r, 10))) {
    if (Date.now() - t0 > ms) assert.fail(`timed out waiting for ${what}`);
  }
}
