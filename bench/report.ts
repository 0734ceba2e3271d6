/**
 * From samples to what a reader checks: medians per case, ratios against the baselines measured
 * in the same run, the goals met or missed, where vmbackup's time goes (activity split from the
 * workflow history); written as latest.json, latest.md and a bar chart (latest.svg, rendered to
 * ratios.png by bench/run.sh).
 */
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { chunkRepoRatioDefs } from './chunk-repo';
import { nbdReadRatioDefs } from './nbd-read';
import { pullRatioDefs } from './pull';

export type Sample = Record<string, number>;

export interface CaseResult {
  id: string;
  label: string;
  samples: Sample[];
  extra?: Array<Record<string, unknown>>;
}

export interface BenchResults {
  startedAt: string;
  durationS: number;
  args: Record<string, unknown>;
  machine: Record<string, string>;
  cases: CaseResult[];
}

export interface RatioDef {
  name: string;
  num: string;
  den: string;
  metric: string;
  /** the denominator's metric when it is not `metric` (stored bytes / changed bytes of one case) */
  denMetric?: string;
  /** compare throughput (den/num of times) rather than time */
  throughput?: boolean;
  goal?: { op: '<=' | '>='; value: number };
}

export interface Ratio extends RatioDef {
  value: number;
  met?: boolean;
}

function med(xs: number[]): number {
  const s = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (s.length === 0) return NaN;
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

export function medians(c: CaseResult): Record<string, { median: number; min: number; max: number; n: number }> {
  const keys = new Set(c.samples.flatMap((s) => Object.keys(s)));
  const out: Record<string, { median: number; min: number; max: number; n: number }> = {};
  for (const k of keys) {
    const xs = c.samples.map((s) => s[k]).filter((x): x is number => typeof x === 'number' && Number.isFinite(x));
    out[k] = { median: med(xs), min: Math.min(...xs), max: Math.max(...xs), n: xs.length };
  }
  return out;
}

/** The incremental group's ratios, for every size and amount of change the run has cases of. */
function incrementalDefs(ids: string[]): RatioDef[] {
  const defs: RatioDef[] = [];
  for (const id of ids) {
    const m = /^(\d+[mg])\/inc-(\d+)m-vmbackup$/.exec(id);
    if (!m) continue;
    const [, sz, mib] = m;
    const virtnbd = `${sz}/inc-${mib}m-virtnbd`;
    const what = `${mib} MiB changed (${sz})`;
    defs.push(
      {
        name: `incremental, ${what}: vmbackup / virtnbdbackup -l inc`,
        num: id,
        den: virtnbd,
        metric: 'wallMs',
        goal: { op: '<=', value: 0.35 },
      },
      {
        name: `incremental, ${what}: vmbackup stored / changed bytes`,
        num: id,
        den: id,
        metric: 'storedMiB',
        denMetric: 'changedMiB',
        goal: { op: '<=', value: 1.1 },
      },
      {
        name: `incremental, ${what}: virtnbdbackup stored / changed bytes`,
        num: virtnbd,
        den: virtnbd,
        metric: 'storedMiB',
        denMetric: 'changedMiB',
      },
      {
        name: `incremental, ${what}: vmbackup stored / virtnbdbackup stored`,
        num: id,
        den: virtnbd,
        metric: 'storedMiB',
      },
    );
  }
  const sizes = new Set(
    ids.filter((id) => /^\d+[mg]\/(restore-chain|inc-full-vmbackup)$/.test(id)).map((id) => id.split('/')[0]!),
  );
  for (const sz of sizes) {
    defs.push(
      {
        name: `restore of a full + 7 increments / of one full (${sz})`,
        num: `${sz}/restore-chain`,
        den: `${sz}/restore-full`,
        metric: 'wallMs',
        goal: { op: '<=', value: 1.3 },
      },
      {
        name: `full that starts the chain: vmbackup / virtnbdbackup (${sz})`,
        num: `${sz}/inc-full-vmbackup`,
        den: `${sz}/inc-full-virtnbd`,
        metric: 'wallMs',
      },
    );
  }
  return defs;
}

function ratioDefs(sizes: string[], ids: string[]): RatioDef[] {
  const defs: RatioDef[] = [];
  for (const sz of sizes) {
    defs.push(
      {
        name: `push full / qemu-img convert (${sz})`,
        num: `${sz}/push-file`,
        den: `${sz}/qemu-img-convert`,
        metric: 'wallMs',
        goal: { op: '<=', value: 1.1 },
      },
      {
        name: `push full / virtnbdbackup (${sz})`,
        num: `${sz}/push-file`,
        den: `${sz}/virtnbdbackup`,
        metric: 'wallMs',
        goal: { op: '<=', value: 0.8 },
      },
      {
        name: `snapshot auto / cp --sparse (${sz})`,
        num: `${sz}/snapshot-auto`,
        den: `${sz}/cp-sparse`,
        metric: 'wallMs',
        goal: { op: '<=', value: 1.15 },
      },
      {
        name: `snapshot rsync / cp --sparse (${sz})`,
        num: `${sz}/snapshot-rsync`,
        den: `${sz}/cp-sparse`,
        metric: 'wallMs',
        goal: { op: '<=', value: 1.15 },
      },
      {
        name: `snapshot cp / cp --sparse (${sz})`,
        num: `${sz}/snapshot-cp`,
        den: `${sz}/cp-sparse`,
        metric: 'wallMs',
        goal: { op: '<=', value: 1.15 },
      },
      {
        name: `virtnbdbackup / qemu-img convert (${sz})`,
        num: `${sz}/virtnbdbackup`,
        den: `${sz}/qemu-img-convert`,
        metric: 'wallMs',
      },
      {
        name: `vmbackup restore / virtnbdrestore (${sz})`,
        num: `${sz}/vmbackup-restore`,
        den: `${sz}/virtnbdrestore`,
        metric: 'wallMs',
      },
    );
  }
  defs.push(
    {
      name: 'S3 put throughput: driver / SDK Upload',
      num: 's3/driver-put',
      den: 's3/sdk-upload',
      metric: 'wallMs',
      throughput: true,
      goal: { op: '>=', value: 0.9 },
    },
    {
      name: 'S3 get throughput: driver / GetObject',
      num: 's3/driver-get',
      den: 's3/sdk-get',
      metric: 'wallMs',
      throughput: true,
    },
    {
      name: 'NFS put throughput: driver / nfs-cp',
      num: 'nfs/driver-put',
      den: 'nfs/nfs-cp-put',
      metric: 'wallMs',
      throughput: true,
    },
    {
      name: 'NFS get throughput: driver / nfs-cp',
      num: 'nfs/driver-get',
      den: 'nfs/nfs-cp-get',
      metric: 'wallMs',
      throughput: true,
    },
    {
      name: 'local put throughput: driver / cp',
      num: 'local/driver-put',
      den: 'local/cp',
      metric: 'wallMs',
      throughput: true,
    },
    { name: 'push to S3 / push to file (1g)', num: '1g/push-s3', den: '1g/push-file', metric: 'wallMs' },
    { name: 'push to NFS / push to file (1g)', num: '1g/push-nfs', den: '1g/push-file', metric: 'wallMs' },
    {
      name: 'push 64 MiB: CLI end to end / libvirt job',
      num: 'overhead/push-64m',
      den: 'overhead/push-64m',
      metric: 'wallMs',
    },
    ...incrementalDefs(ids),
    ...nbdReadRatioDefs(ids),
    ...chunkRepoRatioDefs(ids),
    ...pullRatioDefs(ids),
    ...ids
      .filter((id) => /^\d+[mg]\/instant-start$/.test(id))
      .map((id) => ({
        name: `instant recovery (${id.split('/')[0]}): full restore / instant start`,
        num: id.replace('instant-start', 'instant-full-restore'),
        den: id,
        metric: 'wallMs',
      })),
  );
  return defs;
}

export function computeRatios(r: BenchResults): Ratio[] {
  const byId = new Map(r.cases.map((c) => [c.id, medians(c)]));
  const sizes = [...new Set(r.cases.map((c) => c.id.split('/')[0]!).filter((s) => /^\d+[mg]$/.test(s)))];
  const out: Ratio[] = [];
  for (const d of ratioDefs(
    sizes,
    r.cases.map((c) => c.id),
  )) {
    const n = byId.get(d.num)?.[d.metric]?.median;
    // one case against itself: another metric of it (the overhead ratio: wall time / the libvirt job's)
    const denMetric = d.denMetric ?? (d.num === d.den ? 'jobMs' : d.metric);
    const den = byId.get(d.den)?.[denMetric]?.median;
    if (n === undefined || den === undefined || !Number.isFinite(n) || !Number.isFinite(den)) continue;
    const value = d.throughput ? den / n : n / den;
    const met = d.goal ? (d.goal.op === '<=' ? value <= d.goal.value : value >= d.goal.value) : undefined;
    out.push({ ...d, value, ...(met === undefined ? {} : { met }) });
  }
  return out;
}

interface AbsoluteGoal {
  name: string;
  value: number;
  unit: string;
  goal: string;
  /** unset: a figure for reference, no goal */
  met?: boolean;
}

function absoluteGoals(r: BenchResults): AbsoluteGoal[] {
  const byId = new Map(r.cases.map((c) => [c.id, medians(c)]));
  const out: AbsoluteGoal[] = [];
  // the goal is judged on the cold run; the warm one is a reference figure
  const overheads = [
    ['overhead/push-64m', 'overhead per backup (CLI end to end - libvirt job), 64 MiB disk', true],
    [
      'overhead/push-64m-warm',
      'the same, warm page cache (for reference; the goal is judged on the cold run above)',
      false,
    ],
  ] as const;
  for (const [id, name, judged] of overheads) {
    const ms = byId.get(id)?.overheadMs?.median;
    if (ms === undefined) continue;
    out.push({
      name,
      value: ms / 1000,
      unit: 's',
      goal: judged ? '<= 1 s' : '-',
      ...(judged ? { met: ms <= 1000 } : {}),
    });
  }
  const conc = r.cases.find((c) => c.id.startsWith('concurrent/'));
  if (conc) {
    const m = medians(conc);
    const mb = (m.workerPeakRssMiB?.max ?? NaN) * 1.048576;
    out.push({
      name: `${conc.id.split('/')[1]} concurrent small backups: worker peak RSS (max of runs)`,
      value: mb,
      unit: 'MB',
      goal: '<= 300 MB',
      met: mb <= 300,
    });
  }
  return out;
}

/** Median run time per activity (and the gaps between them) for cases that recorded a split. */
function splits(c: CaseResult): Record<string, number> | undefined {
  const xs = (c.extra ?? [])
    .map((e) => e.split as Record<string, number> | undefined)
    .filter((x): x is Record<string, number> => !!x);
  if (xs.length === 0) return undefined;
  const keys = new Set(xs.flatMap((x) => Object.keys(x)));
  return Object.fromEntries([...keys].map((k) => [k, med(xs.map((x) => x[k] ?? 0))]));
}

const fmt = (x: number | undefined, digits = 0) => (x === undefined || !Number.isFinite(x) ? '-' : x.toFixed(digits));
const s1 = (ms: number | undefined) => (ms === undefined || !Number.isFinite(ms) ? '-' : (ms / 1000).toFixed(2));

export function markdown(r: BenchResults, ratios: Ratio[]): string {
  const lines: string[] = [];
  lines.push(
    `Run ${r.startedAt}, ${Math.round(r.durationS / 60)} min, ${String(r.args.reps)} repetitions per case, cold page cache before each run.`,
    '',
  );
  lines.push('| machine | |', '|---|---|', ...Object.entries(r.machine).map(([k, v]) => `| ${k} | ${v} |`), '');
  lines.push('### Ratios (medians of this run)', '', '| ratio | value | goal | met |', '|---|---|---|---|');
  for (const q of ratios) {
    lines.push(
      `| ${q.name} | ${q.value.toFixed(2)}x | ${q.goal ? `${q.goal.op} ${q.goal.value}` : ''} | ${q.met === undefined ? '' : q.met ? 'yes' : '**no**'} |`,
    );
  }
  const abs = absoluteGoals(r);
  if (abs.length) {
    lines.push('', '| absolute goal | value | goal | met |', '|---|---|---|---|');
    for (const a of abs)
      lines.push(
        `| ${a.name} | ${a.value.toFixed(2)} ${a.unit} | ${a.goal} | ${a.met === undefined ? '-' : a.met ? 'yes' : '**no**'} |`,
      );
  }
  lines.push('', '### Cases (median, min..max over the repetitions)', '');
  lines.push(
    '| case | wall s | CPU s | peak RSS MiB | worker CPU s | worker peak RSS MiB | other |',
    '|---|---|---|---|---|---|---|',
  );
  for (const c of r.cases) {
    const m = medians(c);
    const wall = m.wallMs ?? m.totalMs;
    const cpu = m.cpuMs ?? m.cliCpuMs;
    const rss = m.peakRssMiB ?? m.cliPeakRssMiB;
    const known = new Set([
      'wallMs',
      'totalMs',
      'cpuMs',
      'cliCpuMs',
      'peakRssMiB',
      'cliPeakRssMiB',
      'workerCpuMs',
      'workerPeakRssMiB',
    ]);
    const other = Object.entries(m)
      .filter(([k]) => !known.has(k))
      .map(([k, v]) => `${k} ${k.endsWith('Ms') ? s1(v.median) + ' s' : fmt(v.median, 1)}`)
      .join(', ');
    lines.push(
      `| ${c.label} | ${wall ? `${s1(wall.median)} (${s1(wall.min)}..${s1(wall.max)})` : '-'} | ${s1(cpu?.median)} | ${fmt(rss?.median)} | ${s1(m.workerCpuMs?.median)} | ${fmt(m.workerPeakRssMiB?.median)} | ${other} |`,
    );
  }
  const withSplit = r.cases.map((c) => [c, splits(c)] as const).filter(([, s]) => s);
  if (withSplit.length) {
    lines.push('', "### Where vmbackup's time goes (median seconds per activity, from the workflow history)", '');
    const acts = [...new Set(withSplit.flatMap(([, s]) => Object.keys(s!)))];
    lines.push(`| case | ${acts.join(' | ')} |`, `|---|${acts.map(() => '---').join('|')}|`);
    for (const [c, s] of withSplit) lines.push(`| ${c.label} | ${acts.map((a) => s1(s![a])).join(' | ')} |`);
  }
  return lines.join('\n') + '\n';
}

export function svgChart(ratios: Ratio[]): string {
  const rows = ratios;
  // room for the longest name (~6.6 px per character at 12 px), bars as wide as before
  const left = Math.max(330, Math.ceil(Math.max(0, ...rows.map((r) => r.name.length)) * 6.6) + 16);
  const W = left + 570;
  const rowH = 26;
  const top = 40;
  const H = top + rows.length * rowH + 40;
  const maxV = Math.max(2, ...rows.map((r) => r.value), ...rows.map((r) => r.goal?.value ?? 0)) * 1.05;
  const x = (v: number) => left + ((W - left - 40) * v) / maxV;
  const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
  const parts: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="DejaVu Sans, sans-serif" font-size="12">`,
    `<rect width="100%" height="100%" fill="white"/>`,
    `<text x="10" y="22" font-size="15" font-weight="bold">vmbackup benchmark ratios (median; green = goal met, red = missed, grey = no goal; | = goal)</text>`,
    `<line x1="${x(1)}" y1="${top - 6}" x2="${x(1)}" y2="${H - 30}" stroke="#888" stroke-dasharray="4 3"/>`,
    `<text x="${x(1) - 8}" y="${H - 14}" fill="#555">1.0</text>`,
  ];
  rows.forEach((r, i) => {
    const y = top + i * rowH;
    const color = r.met === undefined ? '#9aa5b1' : r.met ? '#2f9e44' : '#e03131';
    parts.push(`<text x="${left - 8}" y="${y + 16}" text-anchor="end">${esc(r.name)}</text>`);
    parts.push(
      `<rect x="${left}" y="${y + 4}" width="${Math.max(1, x(r.value) - left)}" height="${rowH - 8}" fill="${color}"/>`,
    );
    parts.push(`<text x="${x(r.value) + 5}" y="${y + 16}">${r.value.toFixed(2)}x</text>`);
    if (r.goal) {
      parts.push(
        `<line x1="${x(r.goal.value)}" y1="${y + 1}" x2="${x(r.goal.value)}" y2="${y + rowH - 1}" stroke="black" stroke-width="2"/>`,
      );
    }
  });
  parts.push('</svg>');
  return parts.join('\n') + '\n';
}

export async function buildReport(r: BenchResults, dir: string): Promise<void> {
  const ratios = computeRatios(r);
  const summary = Object.fromEntries(r.cases.map((c) => [c.id, { label: c.label, ...medians(c), split: splits(c) }]));
  await writeFile(
    join(dir, 'latest.json'),
    JSON.stringify({ ...r, summary, ratios, goals: absoluteGoals(r) }, null, 2) + '\n',
  );
  await writeFile(join(dir, 'latest.md'), markdown(r, ratios));
  await writeFile(join(dir, 'latest.svg'), svgChart(ratios));
}
