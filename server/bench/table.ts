/**
 * The one table every measurement reports into: a markdown table for people, then one JSON line
 * (prefixed `BENCH_JSON `) for machines.
 */

export interface Row {
  /** Which measurement (1 server, 2 worker protocol, 3 SDK, 4 training, 5 inference relay) the line belongs to. */
  section: number;
  /** What was measured, with its unit: `GET /v1/training/jobs/{id} · req/s`. */
  measurement: string;
  /** Tunery's figure (median of the repeats). */
  tunery: number | null;
  /** The peer's figure, measured in the same run. */
  peer: number | null;
  /** What the peer is: `bare Express`, `raw fetch`, … */
  peerName: string | null;
  /** tunery / peer. */
  ratio: number | null;
  notes: string;
}

/** What each measurement returns: its lines, its raw figures, and whether its checks held. */
export interface Measured {
  rows: Row[];
  data: Record<string, unknown>;
  /** False when a correctness check failed (the figures are still shown). */
  ok?: boolean;
}

/** A measurement that could not run still gets its line, saying why. */
export function failedRow(section: number, measurement: string, err: unknown): Row {
  const message = err instanceof Error ? err.message : String(err);
  return {
    section,
    measurement,
    tunery: null,
    peer: null,
    peerName: null,
    ratio: null,
    notes: `FAILED: ${message.split('\n')[0]!.slice(0, 200)}`,
  };
}

/** 12,345 · 123 · 12.3 · 1.23 · 0.123: three significant figures at most, thousands grouped. */
export function formatNumber(value: number | null): string {
  if (value == null || !Number.isFinite(value)) return '—';
  const abs = Math.abs(value);
  const digits = abs >= 100 ? 0 : abs >= 10 ? 1 : abs >= 1 ? 2 : 3;
  return value.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

const formatRatio = (value: number | null) => (value == null ? '—' : `${value.toFixed(2)}×`);

export function renderTable(rows: readonly Row[]): string {
  const header = ['#', 'measurement', 'Tunery', 'peer', 'Tunery/peer', 'notes'];
  const lines = rows.map((row) => [
    String(row.section),
    row.measurement,
    formatNumber(row.tunery),
    row.peer == null ? '—' : `${formatNumber(row.peer)} (${row.peerName})`,
    formatRatio(row.ratio),
    row.notes,
  ]);
  const widths = header.map((h, c) => Math.max(h.length, ...lines.map((line) => line[c]!.length)));
  const format = (cells: string[]) => `| ${cells.map((cell, c) => cell.padEnd(widths[c]!)).join(' | ')} |`;
  return [format(header), format(widths.map((w) => '-'.repeat(w))), ...lines.map(format)].join('\n');
}

export function jsonLine(report: Record<string, unknown>): string {
  return `BENCH_JSON ${JSON.stringify(report)}`;
}
