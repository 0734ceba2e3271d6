/**
 * What a driver backed by a directory tree (local, NFS) answers straight from its atomic tree: the format's
 * writer and lister are one (./atomic-tree.ts); the driver adds its reads, its checks and its copy engine.
 */
import type { ObjectInfo, PutImageOptions, PutImageResult } from '../contract';
import type { AtomicTree } from './atomic-tree';

export abstract class TreeTarget {
  protected abstract readonly tree: AtomicTree;

  putImage(key: string, sourcePath: string, opts: PutImageOptions = {}): Promise<PutImageResult> {
    return this.tree.putImage(key, sourcePath, opts);
  }

  putManifest(key: string, body: Buffer): Promise<void> {
    return this.tree.putManifest(key, body);
  }

  putBatched(key: string, body: Buffer): Promise<void> {
    return this.tree.putBatched(key, body);
  }

  flush(): Promise<void> {
    return this.tree.flush();
  }

  stat(key: string): Promise<ObjectInfo | undefined> {
    return this.tree.stat(key);
  }

  list(prefix: string): AsyncIterable<ObjectInfo> {
    return this.tree.list(prefix);
  }

  listTop(): AsyncIterable<string> {
    return this.tree.listTop();
  }

  delete(key: string): Promise<void> {
    return this.tree.delete(key);
  }

  removeUnfinished(prefix: string): Promise<number> {
    return this.tree.removeUnfinished(prefix);
  }
}
