// A Node BullMQ worker like the platforms' own (seed 003's billing webhook worker): it processes
// jobs from a queue and prints each one as a JSON line, then exits after `count` jobs or a timeout.
// Usage: node worker.mjs <redis-url> <queue> <prefix> [count] [timeout-ms] [mode]
//   mode `complete` (the default): each job completes;
//   mode `fail`: each job fails, as a worker whose downstream is down does ("ECONNRESET talking to
//   ledger"), and the worker exits after `count` failures.
// "ready" is written to stderr once the worker is connected and waiting for jobs.
import { Worker } from 'bullmq';
import IORedis from 'ioredis';

const [url, queue, prefix, count = '1', timeoutMs = '15000', mode = 'complete'] = process.argv.slice(2);
const connection = new IORedis(url, { maxRetriesPerRequest: null });
let seen = 0;
const worker = new Worker(queue, async (job) => {
  process.stdout.write(JSON.stringify({ id: job.id, name: job.name, data: job.data, attemptsMade: job.attemptsMade }) + '\n');
  if (mode === 'fail') throw new Error('ECONNRESET talking to ledger');
  return { processedBy: 'node-bullmq' };
}, { connection, prefix });
worker.on(mode === 'fail' ? 'failed' : 'completed', async () => {
  seen += 1;
  if (seen >= Number(count)) { await worker.close(); await connection.quit(); process.exit(0); }
});
worker.on('error', (err) => { process.stderr.write(`worker error: ${err}\n`); });
worker.waitUntilReady().then(() => process.stderr.write('ready\n'));
setTimeout(async () => { process.stderr.write('timeout waiting for jobs\n'); process.exit(2); }, Number(timeoutMs));
