/**
 * Pre-shared key files, as the NBD server's TLS-PSK (`serve --tls-psk FILE`) and the mirror
 * link (`--mirror-psk FILE`) read them: one `identity:hexkey` per line, blank lines and
 * `#` comments allowed. One parser and one size cap for both.
 *
 * Invariants: a file larger than PSK_FILE_MAX_BYTES is refused before it is read; every
 * error is one line naming the file (and the line, for a malformed one).
 */
import * as fs from 'fs';

/** Largest PSK keys file read; the format is tiny. */
export const PSK_FILE_MAX_BYTES = 1024 * 1024;

/** Parses a PSK keys file's text; `where` names it in errors. */
export function parsePskFile(text: string, where: string): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  text.split('\n').forEach((raw, i) => {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) return;
    const m = /^([^:]{1,255}):([0-9a-fA-F]{2,512})$/.exec(line);
    if (!m || (m[2] as string).length % 2 !== 0) throw new Error(`bad PSK file ${where} line ${i + 1}: expected identity:hexkey`);
    keys.set(m[1] as string, Buffer.from(m[2] as string, 'hex'));
  });
  if (keys.size === 0) throw new Error(`PSK file ${where} has no keys`);
  return keys;
}

/** Reads and parses the PSK file at `p`; `what` names it in errors (e.g. "TLS PSK file"). */
export function readPskFile(p: string, what: string): Map<string, Buffer> {
  let text: string;
  try {
    const st = fs.statSync(p);
    if (st.isFile() && st.size > PSK_FILE_MAX_BYTES) throw new Error(`${what} ${p} is larger than ${PSK_FILE_MAX_BYTES} bytes`);
    text = fs.readFileSync(p, 'utf8');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw code === undefined ? e : new Error(`cannot read ${what} ${p}: ${code}`);
  }
  return parsePskFile(text, p);
}
