/**
 * A process that makes one fixture domain with `parentDir` and then waits to be killed (kill -9: its exit hook never
 * runs), so a test can check that cleanupStaleFixtures finds what a dead run left outside fixtureRoot().
 *   node -r ./test/storage/ts-register.js test/helpers/fixture-child.ts PREFIX PARENT_DIR
 */
import { createFixtureDomain } from '../fixtures/domains';

async function main(): Promise<void> {
  const [prefix, parentDir] = process.argv.slice(2) as [string, string];
  const d = await createFixtureDomain({ prefix, parentDir, disks: [{ format: 'raw', sizeMiB: 1 }] });
  process.stdout.write(`${d.name} ${d.dir}\n`);
  setInterval(() => undefined, 1 << 30);
}

main().catch((err: unknown) => {
  process.stderr.write(`${String(err)}\n`);
  process.exit(1);
});
