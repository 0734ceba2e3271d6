/** Two projects: fast unit tests, and integration tests against the real stack (Temporal, libvirt/QEMU, radosgw, ganesha). */
const tsJest = { '^.+\\.ts$': ['ts-jest', { tsconfig: 'tsconfig.json' }] };
module.exports = {
  projects: [
    {
      displayName: 'unit',
      testEnvironment: 'node',
      transform: tsJest,
      testMatch: ['<rootDir>/test/unit/**/*.test.ts'],
    },
    {
      displayName: 'integration',
      testEnvironment: 'node',
      transform: tsJest,
      testMatch: [
        '<rootDir>/test/integration/**/*.test.ts',
        '<rootDir>/test/storage/**/*.test.ts',
        '<rootDir>/test/workflows/**/*.test.ts',
        '<rootDir>/test/replay/**/*.test.ts',
      ],
      slowTestThreshold: 60,
    },
  ],
  testTimeout: 300_000,
  // VMBACKUP_TEST_ORDER=reverse|random (scripts/test-all.sh): run the files in another order
  testSequencer: '<rootDir>/test/sequencer.js',
};
