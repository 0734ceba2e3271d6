// @ts-check
import js from '@eslint/js';
import tseslint from 'typescript-eslint';
import importX from 'eslint-plugin-import-x';
import { builtinModules } from 'node:module';

const nodeBuiltins = [...builtinModules, ...builtinModules.map((m) => `node:${m}`)];

export default tseslint.config(
  { ignores: ['dist/**', 'dist-check/**', 'node_modules/**', 'coverage/**', 'bench/results/**', 'bench/.build/**'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    files: ['**/*.ts'],
    languageOptions: { parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname } },
    plugins: { 'import-x': importX },
    settings: { 'import-x/resolver': { node: { extensions: ['.ts', '.js'] } } },
    rules: {
      '@typescript-eslint/no-floating-promises': 'error',
      '@typescript-eslint/consistent-type-imports': 'error',
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_' }],
      'import-x/no-cycle': 'error',
    },
  },
  {
    // Workflows are replayed in Temporal's deterministic sandbox: no I/O, no drivers, no SDKs.
    files: ['src/workflows/**/*.ts'],
    rules: {
      'no-restricted-imports': [
        'error',
        {
          paths: nodeBuiltins.map((name) => ({ name, message: 'Workflows must be deterministic: no Node built-ins.' })),
          patterns: [
            {
              group: ['**/hypervisor', '**/hypervisor/**'],
              message: 'Workflows call activities; never the hypervisor port.',
            },
            { group: ['**/storage', '**/storage/**'], message: 'Workflows call activities; never storage drivers.' },
            { group: ['@aws-sdk/*'], message: 'Workflows call activities; never the AWS SDK.' },
          ],
        },
      ],
    },
  },
  // restic's layers, direction enforced: storage (backends) <- repository (what a backup is on a target) <- activities
  // and cli. Storage knows nothing above it; activities and the CLI open targets through the registry and never
  // reach into a driver.
  {
    files: ['src/storage/**/*.ts'],
    rules: {
      'no-restricted-imports': [
        'error',
        {
          patterns: [
            {
              group: [
                '**/repository',
                '**/repository/**',
                '**/activities',
                '**/activities/**',
                '**/hypervisor',
                '**/hypervisor/**',
              ],
              message: 'storage/ holds the backends only: it never imports repository/, activities/ or hypervisor/.',
            },
            {
              group: ['**/workflows', '**/workflows/**', '**/cli/**', '**/client/**', '**/worker', '**/worker/**'],
              message: 'storage/ holds the backends only.',
            },
          ],
        },
      ],
    },
  },
  {
    files: ['src/repository/**/*.ts'],
    rules: {
      'no-restricted-imports': [
        'error',
        {
          patterns: [
            {
              group: [
                '**/activities',
                '**/activities/**',
                '**/workflows',
                '**/workflows/**',
                '**/cli/**',
                '**/client/**',
                '**/worker',
                '**/worker/**',
              ],
              message: 'repository/ is below activities and the CLI: it never imports them.',
            },
            {
              group: ['**/storage/local/**', '**/storage/nfs/**', '**/storage/s3/**'],
              message: 'repository/ works through the StorageTarget contract, never a driver.',
            },
          ],
        },
      ],
    },
  },
  // src/nbd is a low-level library like src/hypervisor: the NBD protocol only, nothing above it.
  {
    files: ['src/nbd/**/*.ts'],
    rules: {
      'no-restricted-imports': [
        'error',
        {
          patterns: [
            {
              group: [
                '**/activities',
                '**/activities/**',
                '**/workflows',
                '**/workflows/**',
                '**/storage',
                '**/storage/**',
                '**/repository',
                '**/repository/**',
                '**/hypervisor',
                '**/hypervisor/**',
                '**/cli/**',
                '**/client/**',
                '**/worker',
                '**/worker/**',
              ],
              message: 'src/nbd speaks the NBD protocol only: it never imports the layers above it.',
            },
          ],
        },
      ],
    },
  },
  {
    // The chunk format's core (docs/chunk-format.md) is a library over the StorageTarget contract: stricter than the
    // rest of repository/ (this block replaces that one for these files), it knows nothing of the image tree either.
    files: ['src/repository/chunks/**/*.ts'],
    rules: {
      'no-restricted-imports': [
        'error',
        {
          patterns: [
            {
              group: [
                '**/activities',
                '**/activities/**',
                '**/workflows',
                '**/workflows/**',
                '**/cli',
                '**/cli/**',
                '**/client',
                '**/client/**',
                '**/worker',
                '**/worker/**',
                '**/hypervisor',
                '**/hypervisor/**',
              ],
              message: 'repository/chunks/ is below activities, workflows and the CLI: it never imports them.',
            },
            {
              group: ['**/storage/local/**', '**/storage/nfs/**', '**/storage/s3/**', '**/storage/registry'],
              message: 'repository/chunks/ works through the StorageTarget contract, never a driver.',
            },
            {
              regex: '^\\.\\./[^./][^/]*$',
              message: 'repository/chunks/ does not depend on the image tree (catalog, manifest, ...) beside it.',
            },
          ],
        },
      ],
    },
  },
  {
    files: ['src/activities/**/*.ts', 'src/cli/**/*.ts'],
    rules: {
      'no-restricted-imports': [
        'error',
        {
          patterns: [
            {
              group: ['**/storage/local/**', '**/storage/nfs/**', '**/storage/s3/**'],
              message:
                'Activities and the CLI go through repository/ (and open targets with storage/registry), never a driver.',
            },
          ],
        },
      ],
    },
  },
  {
    files: ['**/*.js', '**/*.mjs'],
    ...tseslint.configs.disableTypeChecked,
    rules: { ...tseslint.configs.disableTypeChecked.rules, '@typescript-eslint/no-require-imports': 'off' },
    languageOptions: {
      globals: {
        require: 'readonly',
        module: 'writable',
        process: 'readonly',
        __dirname: 'readonly',
        console: 'readonly',
      },
    },
  },
);
