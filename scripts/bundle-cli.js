// Bundles the command line into one file (dist/cli/bundle.js) at build time. A command that talks to
// Temporal loads @temporalio/client, grpc-js and protobufjs: ~220 files. From a cold page cache (a
// nightly cron job) reading them one by one costs ~0.2 s per command; one file is read in one go.
//
// Left out of the bundle, loaded from dist/ and node_modules as usual:
// - the worker (dist/worker/index.js and all it loads): `vmbackup worker` and the embedded default
//   run it from dist/, where it finds the prebuilt workflow bundle and the native Temporal core;
// - the AWS SDK (loaded only when an S3 target is opened) and node-rsync;
// - @bokuweb/zstd-wasm: it reads its zstd.wasm next to its own file (bundled, it looked in dist/cli and failed).
'use strict';
const { dirname, join, relative, resolve, sep } = require('node:path');
const webpack = require('webpack');

const dist = join(__dirname, '..', 'dist');
const outDir = join(dist, 'cli');
const EXTERNAL_PACKAGES = [
  /^@temporalio\/worker(\/|$)/,
  /^@aws-sdk\//,
  /^@smithy\//,
  /^rsync$/,
  /^@bokuweb\/zstd-wasm(\/|$)/,
];
const WORKER_ENTRY = join(dist, 'worker', 'index.js');

/** `require('../../worker')` from a bundled file becomes `require('../worker/index.js')` from dist/cli. */
function externals({ context, request }, callback) {
  if (EXTERNAL_PACKAGES.some((re) => re.test(request))) return callback(null, `commonjs ${request}`);
  if (request.startsWith('.') && context.startsWith(dist + sep)) {
    const target = resolve(context, request);
    if (target === dirname(WORKER_ENTRY) || target === WORKER_ENTRY || target + '.js' === WORKER_ENTRY) {
      return callback(null, `commonjs ./${relative(outDir, WORKER_ENTRY).split(sep).join('/')}`);
    }
  }
  return callback();
}

const config = {
  mode: 'production',
  target: 'node20',
  context: dist,
  entry: join(dist, 'cli', 'main.js'),
  output: { path: outDir, filename: 'bundle.js', library: { type: 'commonjs2' } },
  externals,
  // real __dirname/__filename: dist/cli, like the unbundled dist/cli/*.js files
  node: { __dirname: false, __filename: false },
  devtool: false,
  optimization: { minimize: false, nodeEnv: false, splitChunks: false },
  plugins: [new webpack.optimize.LimitChunkCountPlugin({ maxChunks: 1 })],
  // @temporalio/common can load a custom payload converter by path; vmbackup uses the default one
  ignoreWarnings: [{ module: /data-converter-helpers/, message: /the request of a dependency is an expression/ }],
  performance: { hints: false },
};

webpack(config, (err, stats) => {
  if (err || stats.hasErrors() || stats.hasWarnings()) {
    console.error(err ?? stats.toString({ all: false, errors: true, warnings: true }));
    process.exit(1);
  }
});
