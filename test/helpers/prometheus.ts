/**
 * A strict parser of the Prometheus text exposition format (version 0.0.4), for tests: every line must be a
 * comment, a HELP or TYPE line, or a sample; anything else throws with the line number. Beyond the syntax it checks
 * what a scraper relies on: HELP/TYPE at most once per family and before its samples, a family's samples together,
 * no series twice, counters not negative, and histograms with cumulative buckets ending in +Inf = _count.
 */

export type MetricType = 'counter' | 'gauge' | 'histogram' | 'summary' | 'untyped';

export interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

export interface Family {
  name: string;
  type: MetricType;
  help?: string;
  samples: Sample[];
}

const METRIC_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*$/;
const TYPES = new Set(['counter', 'gauge', 'histogram', 'summary', 'untyped']);

export function parsePrometheusText(text: string): Map<string, Family> {
  if (text.length > 0 && !text.endsWith('\n')) throw new Error('the exposition does not end with a newline');
  const families = new Map<string, Family>();
  const closed = new Set<string>();
  const typed = new Set<string>();
  const series = new Set<string>();
  let current: string | undefined;
  const lines = text.split('\n');
  lines.pop(); // after the final newline
  lines.forEach((line, i) => {
    const where = `line ${i + 1} (${JSON.stringify(line.slice(0, 120))})`;
    if (line.trim() === '') return;
    if (line.startsWith('#')) {
      const m = /^# (HELP|TYPE) (\S+)(?: (.*))?$/.exec(line);
      if (!m) return; // a plain comment
      const [, kind, name, rest = ''] = m as unknown as [string, string, string, string | undefined];
      if (!METRIC_NAME.test(name)) throw new Error(`${where}: bad metric name`);
      const fam = familyFor(name);
      if (fam.samples.length > 0) throw new Error(`${where}: ${kind} after the samples of ${name}`);
      if (kind === 'TYPE') {
        if (!TYPES.has(rest)) throw new Error(`${where}: unknown type`);
        if (typed.has(name)) throw new Error(`${where}: a second TYPE for ${name}`);
        typed.add(name);
        fam.type = rest as MetricType;
      } else {
        if (fam.help !== undefined) throw new Error(`${where}: a second HELP for ${name}`);
        if (/\\[^\\n]/.test(rest.replace(/\\\\/g, ''))) throw new Error(`${where}: bad escape in HELP`);
        fam.help = rest;
      }
      switchTo(name, where);
      return;
    }
    const sample = parseSample(line, where);
    const owner = ownerOf(sample.name);
    switchTo(owner, where);
    const key = `${sample.name}${JSON.stringify(Object.entries(sample.labels).sort())}`;
    if (series.has(key)) throw new Error(`${where}: the series ${key} appears twice`);
    series.add(key);
    familyFor(owner).samples.push(sample);
  });
  for (const fam of families.values()) checkFamily(fam);
  return families;

  function familyFor(name: string): Family {
    let fam = families.get(name);
    if (!fam) {
      fam = { name, type: 'untyped', samples: [] };
      families.set(name, fam);
    }
    return fam;
  }

  /** the declared family a sample name belongs to (`x_bucket` of histogram `x`), else its own name */
  function ownerOf(name: string): string {
    for (const suffix of ['_bucket', '_sum', '_count']) {
      if (!name.endsWith(suffix)) continue;
      const base = name.slice(0, -suffix.length);
      const fam = families.get(base);
      if (fam && (fam.type === 'histogram' || (fam.type === 'summary' && suffix !== '_bucket'))) return base;
    }
    return name;
  }

  function switchTo(name: string, where: string): void {
    if (current === name) return;
    if (closed.has(name)) throw new Error(`${where}: the lines of ${name} are not together`);
    if (current !== undefined) closed.add(current);
    current = name;
  }
}

function parseSample(line: string, where: string): Sample {
  const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? ([^ ]+)(?: (-?\d+))?$/.exec(line);
  if (!m) throw new Error(`${where}: not a sample line`);
  const [, name, labelText, valueText] = m as unknown as [string, string, string | undefined, string];
  return { name, labels: labelText ? parseLabels(labelText, where) : {}, value: parseValue(valueText, where) };
}

function parseLabels(text: string, where: string): Record<string, string> {
  const labels: Record<string, string> = {};
  let i = 1; // after '{'
  const end = text.length - 1; // the '}'
  while (i < end) {
    const eq = text.indexOf('=', i);
    if (eq < 0) throw new Error(`${where}: a label without '='`);
    const name = text.slice(i, eq);
    if (!LABEL_NAME.test(name)) throw new Error(`${where}: bad label name ${JSON.stringify(name)}`);
    if (name in labels) throw new Error(`${where}: label ${name} twice`);
    if (text[eq + 1] !== '"') throw new Error(`${where}: label ${name} is not quoted`);
    let value = '';
    let j = eq + 2;
    for (;;) {
      const c = text[j];
      if (c === undefined || j >= end) throw new Error(`${where}: unterminated value of label ${name}`);
      if (c === '"') break;
      if (c === '\\') {
        const n = text[j + 1];
        if (n === '\\') value += '\\';
        else if (n === '"') value += '"';
        else if (n === 'n') value += '\n';
        else throw new Error(`${where}: bad escape in label ${name}`);
        j += 2;
        continue;
      }
      if (c === '\n') throw new Error(`${where}: raw newline in label ${name}`);
      value += c;
      j++;
    }
    labels[name] = value;
    i = j + 1;
    if (text[i] === ',') i++;
    else if (i !== end) throw new Error(`${where}: expected ',' or '}' after label ${name}`);
  }
  return labels;
}

function parseValue(text: string, where: string): number {
  // Prometheus reads values with Go's strconv.ParseFloat: NaN and Inf in any case (prom-client writes `Nan`)
  if (/^nan$/i.test(text)) return NaN;
  if (/^\+?inf(inity)?$/i.test(text)) return Infinity;
  if (/^-inf(inity)?$/i.test(text)) return -Infinity;
  if (!/^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(text)) throw new Error(`${where}: bad value ${text}`);
  return Number(text);
}

function checkFamily(fam: Family): void {
  if (fam.type === 'counter') {
    for (const s of fam.samples) {
      if (!(s.value >= 0)) throw new Error(`counter ${s.name} is ${s.value}`);
    }
  }
  if (fam.type !== 'histogram') return;
  const groups = new Map<string, { buckets: Array<[number, number]>; count?: number }>();
  for (const s of fam.samples) {
    const { le, ...rest } = s.labels;
    const key = JSON.stringify(Object.entries(rest).sort());
    const g = groups.get(key) ?? { buckets: [] };
    groups.set(key, g);
    if (s.name === `${fam.name}_bucket`) {
      if (le === undefined) throw new Error(`${s.name} without le`);
      g.buckets.push([parseValue(le, `le of ${s.name}`), s.value]);
    } else if (s.name === `${fam.name}_count`) g.count = s.value;
    else if (s.name !== `${fam.name}_sum`) throw new Error(`${s.name} in histogram ${fam.name}`);
  }
  for (const [key, g] of groups) {
    const sorted = [...g.buckets].sort((a, b) => a[0] - b[0]);
    for (let k = 1; k < sorted.length; k++) {
      if (sorted[k]![1] < sorted[k - 1]![1]) throw new Error(`histogram ${fam.name}${key}: buckets not cumulative`);
    }
    const inf = sorted[sorted.length - 1];
    if (!inf || inf[0] !== Infinity) throw new Error(`histogram ${fam.name}${key}: no +Inf bucket`);
    if (g.count !== inf[1]) throw new Error(`histogram ${fam.name}${key}: _count ${g.count} != +Inf bucket ${inf[1]}`);
  }
}

/** The value of one series, or undefined when the exposition has none with exactly these labels (and maybe more). */
export function valueOf(
  families: Map<string, Family>,
  name: string,
  labels: Record<string, string>,
): number | undefined {
  for (const fam of families.values()) {
    for (const s of fam.samples) {
      if (s.name !== name) continue;
      if (Object.entries(labels).every(([k, v]) => s.labels[k] === v)) return s.value;
    }
  }
  return undefined;
}

/** Sum of every series of a sample name whose labels include these. */
export function sumOf(families: Map<string, Family>, name: string, labels: Record<string, string> = {}): number {
  let sum = 0;
  for (const fam of families.values()) {
    for (const s of fam.samples) {
      if (s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v)) sum += s.value;
    }
  }
  return sum;
}
