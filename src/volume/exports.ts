import type { Volume } from './types';

/** What the NBD server can serve: one or more named exports, looked up at OPT_GO / EXPORT_NAME time. */
export interface ExportInfo {
  name: string;
  description: string;
}

export interface ExportRegistry {
  /** Exports shown to NBD_OPT_LIST (may change over time, e.g. snapshots NAME@SNAP). */
  list(): ExportInfo[];
  /** The volume for a name, or undefined if there is no such export. */
  lookup(name: string): Volume | undefined;
  /** Why a name lookup() did not find is not served (yet), for the client's error; undefined: plainly unknown. */
  whyMissing?(name: string): string | undefined;
}

/** A registry with a fixed set of volumes. */
export class StaticExports implements ExportRegistry {
  private readonly byName = new Map<string, Volume>();
  constructor(entries: Array<[string, Volume]>) {
    for (const [name, vol] of entries) this.byName.set(name, vol);
  }
  list(): ExportInfo[] {
    return [...this.byName.entries()].map(([name, v]) => ({ name, description: v.description }));
  }
  lookup(name: string): Volume | undefined {
    return this.byName.get(name);
  }
}
