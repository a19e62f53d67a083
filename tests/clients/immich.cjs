// immich's own client libraries against what hearth provisioned.
//
// Reads the environment as immich-server does (server/src/repositories/config.repository.ts:
// REDIS_HOSTNAME, REDIS_PORT, REDIS_DBINDEX, REDIS_USERNAME, REDIS_PASSWORD for BullMQ with the
// prefix immich_bull; DB_HOSTNAME, DB_PORT, DB_USERNAME, DB_PASSWORD, DB_DATABASE_NAME for
// postgres.js with the options of its createPostgres), then runs one BullMQ job through a Queue
// and a Worker, as its job repository does, and a query with the database's extensions.
// Prints {"ok":true,...} or {"ok":false,"error":...}; exits 0 or 1.
'use strict';

const { Queue, Worker } = require('bullmq');
const postgres = require('postgres');

const env = process.env;
const number = (value) => (value === undefined || value === '' ? undefined : Number(value));

const redis = {
  host: env.REDIS_HOSTNAME || 'redis',
  port: number(env.REDIS_PORT) || 6379,
  db: number(env.REDIS_DBINDEX) || 0,
  username: env.REDIS_USERNAME || undefined,
  password: env.REDIS_PASSWORD || undefined,
};
const bull = {
  prefix: 'immich_bull',
  connection: { ...redis },
  defaultJobOptions: { attempts: 3, removeOnComplete: true, removeOnFail: false },
};

let finished = false;
async function finish(code, report, closers) {
  if (finished) return;
  finished = true;
  console.log(JSON.stringify(report));
  await Promise.race([
    Promise.allSettled(closers.map((close) => close())),
    new Promise((resolve) => setTimeout(resolve, 3000)),
  ]);
  process.exit(code);
}

async function main() {
  const closers = [];
  const fail = (error) => finish(1, { ok: false, error: String(error?.message ?? error) }, closers);
  setTimeout(() => fail('no answer within 30s'), 30000);
  process.on('unhandledRejection', fail);
  process.on('uncaughtException', fail);

  const sql = postgres({
    host: env.DB_HOSTNAME || 'database',
    port: number(env.DB_PORT) || 5432,
    username: env.DB_USERNAME || 'postgres',
    password: env.DB_PASSWORD || 'postgres',
    database: env.DB_DATABASE_NAME || 'immich',
    ssl: false,
    max: 10,
    connection: { TimeZone: 'UTC', DateStyle: 'ISO' },
    onnotice: () => {},
  });
  closers.push(() => sql.end({ timeout: 2 }));
  const [{ user, database }] = await sql`SELECT current_user AS user, current_database() AS database`;
  const extensions = (await sql`SELECT extname FROM pg_extension ORDER BY 1`).map((row) => row.extname);
  await sql`CREATE TABLE IF NOT EXISTS asset (id uuid PRIMARY KEY, name text)`;

  const queue = new Queue('thumbnailGeneration', bull);
  closers.push(() => queue.close());
  let worker;
  const done = new Promise((resolve, reject) => {
    worker = new Worker('thumbnailGeneration', async (job) => job.data.asset, { ...bull, concurrency: 1 });
    worker.on('error', reject);
    worker.on('completed', (_job, result) => resolve(result));
    worker.on('failed', (_job, error) => reject(error));
  });
  closers.unshift(() => worker.close(true));
  const asset = `asset-${process.pid}`;
  await queue.add('generateThumbnail', { asset });
  if ((await done) !== asset) throw new Error('the job came back with another result');
  const client = await queue.client;
  await finish(0, { ok: true, user, database, extensions, redisUser: client.options.username, db: client.options.db }, closers);
}

main().catch((error) => {
  console.log(JSON.stringify({ ok: false, error: String(error?.message ?? error) }));
  process.exit(1);
});
