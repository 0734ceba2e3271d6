/** The one activity of the Temporal smoke test: proves a worker on the real server runs activities. */
export function createSmokeActivities() {
  return {
    async echo(text: string): Promise<string> {
      return `echo: ${text}`;
    },
  };
}

export type SmokeActivities = ReturnType<typeof createSmokeActivities>;
