-- Edgeway shared state in PostgreSQL / Supabase: the store behind postgres:// and Supabase.
--
-- One call of edgeway.batch(commands, now_ms) runs every command of one request, in order, in one
-- transaction: one round trip per request, as with Redis pipelines. The rate-limit algorithms are the
-- ones of middleware/store/lua/ratelimit.lua, step for step (same float arithmetic: double precision
-- here, Lua numbers there), heartbeats those of heartbeat.lua, so every backend gives the same answers;
-- tests/stores holds them to it.
--
-- Apply with psql (psql "$DATABASE_URL" -f this-file) or `supabase db push`. Idempotent: safe to apply
-- again, e.g. to pick up a newer version of the functions.
--
-- Concurrency: rate-limit and heartbeat commands take a transaction-scoped advisory lock per key, all
-- the keys of the whole batch in one sorted order (no deadlocks), so concurrent callers are exact: the
-- read-decide-charge of one request never interleaves with another's on the same key. This needs READ
-- COMMITTED (the default): each statement after a lock wait then sees the previous holder's writes.
--
-- Time: the database clock (clock_timestamp()), like Redis TIME, so app instances with skewed clocks
-- agree; tests pass now_ms instead, which then applies to every command of that batch.
--
-- State is a cache (counters, buckets, cached values): the tables are UNLOGGED (no WAL, much faster
-- writes; emptied after a database crash, like a Redis without persistence) and rows carry expires_at.
-- Expired rows are ignored by every read; edgeway.cleanup() deletes them. Schedule it with pg_cron
-- (Supabase: Database > Extensions > pg_cron):
--
--     select cron.schedule('edgeway-cleanup', '* * * * *', 'select edgeway.cleanup()');
--
-- Security: the functions are SECURITY DEFINER with a fixed search_path and every table reference
-- schema-qualified; EXECUTE is revoked from PUBLIC, anon and authenticated and granted only to
-- service_role. The tables have row level security on and no policies, and no grants: only the
-- functions (running as their owner) touch them. PostgREST serves only exposed schemas (public by
-- default), so public.edgeway_batch is the thin wrapper it calls: POST /rest/v1/rpc/edgeway_batch.

create schema if not exists edgeway;

do $$
begin
  if not exists (select 1 from pg_catalog.pg_roles where rolname = 'service_role') then
    create role service_role nologin;  -- Supabase has it; plain PostgreSQL gets one to grant to
  end if;
end
$$;

revoke all on schema edgeway from public;
grant usage on schema edgeway to service_role;

-- Values (Set/Get), window counters (fixed and sliding window) and token buckets, one row per key.
create unlogged table if not exists edgeway.entries (
  key        text primary key,
  value      text,              -- Set/Get text value
  counter    bigint,            -- fixed-window / sliding-window counter of one window
  tokens     double precision,  -- token bucket: tokens left at ts_ms ...
  ts_ms      bigint,            -- ... (ms since the Unix epoch)
  expires_at timestamptz not null
);
create index if not exists entries_expires_at_idx on edgeway.entries (expires_at);
-- binary values (Set with bytes) live in `data`, text ones in `value`
alter table edgeway.entries add column if not exists data bytea;

-- Sliding-log entries: one row per unit charged (a Redis sorted set of (at_ms, seq) per key).
create unlogged table if not exists edgeway.log_entries (
  key        text not null,
  at_ms      bigint not null,
  seq        bigint not null,
  expires_at timestamptz not null,
  primary key (key, at_ms, seq)
);
create index if not exists log_entries_expires_at_idx on edgeway.log_entries (expires_at);

-- Heartbeats: the instances seen under one key, each with its last beat (a Redis sorted set per key).
create unlogged table if not exists edgeway.heartbeats (
  key        text not null,
  instance   text not null,
  at_ms      bigint not null,
  expires_at timestamptz not null,
  primary key (key, instance)
);
create index if not exists heartbeats_expires_at_idx on edgeway.heartbeats (expires_at);

-- Published messages, kept a minute, for subscribers that cannot LISTEN (Supabase over PostgREST poll
-- edgeway_events); direct connections hear pg_notify instead.
create unlogged table if not exists edgeway.events (
  id         bigint generated always as identity primary key,
  channel    text not null,
  message    text not null,
  at         timestamptz not null default clock_timestamp()
);
create index if not exists events_at_idx on edgeway.events (at);

alter table edgeway.events enable row level security;
alter table edgeway.entries enable row level security;
alter table edgeway.log_entries enable row level security;
alter table edgeway.heartbeats enable row level security;
revoke all on edgeway.entries, edgeway.log_entries, edgeway.heartbeats, edgeway.events from public;

-- ms since the Unix epoch -> timestamptz, exactly (integer microseconds)
create or replace function edgeway.ms_to_ts(ms bigint) returns timestamptz
language sql stable parallel safe
set search_path = edgeway, pg_catalog, pg_temp
as $$ select pg_catalog.to_timestamp(0) + ms * interval '1 millisecond' $$;

-- Circuit breakers: one row per upstream breaker (the Redis hash of lua/breaker.lua).
create unlogged table if not exists edgeway.breakers (
  key        text primary key,
  phase      int not null,     -- 0 closed, 1 open, 2 half-open
  failures   bigint not null,  -- consecutive failures while closed
  streak     int not null,     -- openings in a row
  until_ms   bigint not null,  -- open: when a probe may go; half-open: when the probe token expires
  successes  int not null,     -- probe successes in half-open
  widx       bigint not null,  -- failure-rate window index, this window's and the previous one's counts
  wt bigint not null, wf bigint not null, pt bigint not null, pf bigint not null,
  expires_at timestamptz not null
);
create index if not exists breakers_expires_at_idx on edgeway.breakers (expires_at);
alter table edgeway.breakers enable row level security;
revoke all on edgeway.breakers from public;

-- One breaker update (middleware/breaker_state.py `apply`, step for step; lua/breaker.lua does the same).
-- rule: [failures, rate_bp, window_ms, min_requests, open_ms, max_open_ms, success_threshold, probe_ms]
-- event: [successes, failures, probe, acquire, reset, seed_phase, seed_remaining_ms, seed_streak, jitter]
-- Returns [phase, remaining_ms, failures, granted, reason, streak]. The caller holds the key's advisory lock.
create or replace function edgeway.breaker_update(p_key text, rule jsonb, event jsonb, v_now bigint)
returns jsonb
language plpgsql volatile security definer
set search_path = edgeway, pg_catalog, pg_temp
as $fn$
declare
  r_failures bigint := (rule ->> 0)::bigint; r_rate bigint := (rule ->> 1)::bigint;
  r_window bigint := (rule ->> 2)::bigint; r_min bigint := (rule ->> 3)::bigint;
  r_open bigint := (rule ->> 4)::bigint; r_max bigint := (rule ->> 5)::bigint;
  r_threshold bigint := (rule ->> 6)::bigint; r_probe bigint := (rule ->> 7)::bigint;
  e_ok bigint := (event ->> 0)::bigint; e_fail bigint := (event ->> 1)::bigint;
  e_probe boolean := (event ->> 2)::int = 1; e_acquire boolean := (event ->> 3)::int = 1;
  e_reset boolean := (event ->> 4)::int = 1; seed_phase int := (event ->> 5)::int;
  seed_remaining bigint := (event ->> 6)::bigint; seed_streak int := (event ->> 7)::int;
  jitter bigint := (event ->> 8)::bigint;
  b edgeway.breakers%rowtype;
  found_row boolean;
  reason int := 0;
  idx bigint;
  weight bigint;
  total bigint;
  failed bigint;
  base bigint;
  granted boolean;
  v_streak int;
begin
  if r_window is null or r_window <= 0 or r_open is null or r_max is null or r_probe is null then
    raise exception 'edgeway.batch: bad breaker rule %', rule using errcode = '22023';
  end if;
  idx := floor(v_now::numeric / r_window)::bigint;
  select * into b from edgeway.breakers x where x.key = p_key and x.expires_at > edgeway.ms_to_ts(v_now);
  found_row := found;
  if not found_row then
    b := row(p_key, 0, 0, 0, 0, 0, idx, 0, 0, 0, 0, null)::edgeway.breakers;
    if seed_phase <> 0 then
      b.phase := 1; b.streak := greatest(1, seed_streak); b.until_ms := v_now + greatest(0, seed_remaining);
    end if;
  end if;
  if e_reset then
    if b.phase <> 0 then reason := 5; end if;
    b := row(p_key, 0, 0, 0, 0, 0, idx, 0, 0, 0, 0, null)::edgeway.breakers;
  end if;
  if idx <> b.widx then
    if idx = b.widx + 1 then
      b.pt := b.wt; b.pf := b.wf;
    else
      b.pt := 0; b.pf := 0;
    end if;
    b.wt := 0; b.wf := 0; b.widx := idx;
  end if;

  if b.phase = 0 then
    if e_ok > 0 or e_fail > 0 then
      if e_ok > 0 then b.failures := 0; end if;
      b.failures := b.failures + e_fail;
      b.wt := b.wt + e_ok + e_fail;
      b.wf := b.wf + e_fail;
      if e_fail > 0 then
        if r_failures > 0 and b.failures >= r_failures then
          reason := 1;
        elsif r_rate > 0 then
          weight := r_window - (v_now - b.widx * r_window);
          total := b.pt * weight + b.wt * r_window;
          failed := b.pf * weight + b.wf * r_window;
          if total >= r_min * r_window and failed * 10000 >= r_rate * total then reason := 2; end if;
        end if;
        if reason in (1, 2) then
          base := least(r_open, r_max);
          b := row(p_key, 1, 0, 1, v_now + base - (base * jitter) / 1000, 0, idx, 0, 0, 0, 0, null)::edgeway.breakers;
        end if;
      end if;
    end if;
  elsif b.phase = 2 and e_probe then
    if e_fail > 0 then
      reason := 3;
      v_streak := b.streak + 1;
      base := least(r_open * v_streak, r_max);
      b := row(p_key, 1, 0, v_streak, v_now + base - (base * jitter) / 1000, 0, idx, 0, 0, 0, 0,
               null)::edgeway.breakers;
    elsif e_ok > 0 then
      if b.successes + e_ok >= r_threshold then
        reason := 4;
        b := row(p_key, 0, 0, 0, 0, 0, idx, 0, 0, 0, 0, null)::edgeway.breakers;
      else
        b.successes := b.successes + e_ok; b.until_ms := v_now;
      end if;
    else
      b.until_ms := least(b.until_ms, v_now);
    end if;
  end if;

  granted := b.phase = 0;
  if e_acquire and b.phase <> 0 and v_now >= b.until_ms then
    if b.phase = 1 then
      reason := 6; b.phase := 2; b.successes := 0;
    end if;
    b.until_ms := v_now + r_probe;
    granted := true;
  end if;

  insert into edgeway.breakers as x (key, phase, failures, streak, until_ms, successes, widx, wt, wf, pt, pf,
                                     expires_at)
  values (p_key, b.phase, b.failures, b.streak, b.until_ms, b.successes, b.widx, b.wt, b.wf, b.pt, b.pf,
          edgeway.ms_to_ts(v_now + 2 * r_window + r_max + 60000))
  on conflict (key) do update
    set phase = excluded.phase, failures = excluded.failures, streak = excluded.streak,
        until_ms = excluded.until_ms, successes = excluded.successes, widx = excluded.widx, wt = excluded.wt,
        wf = excluded.wf, pt = excluded.pt, pf = excluded.pf, expires_at = excluded.expires_at;
  return jsonb_build_array(b.phase, case when b.phase = 0 then 0 else greatest(0, b.until_ms - v_now) end,
                           b.failures, case when granted then 1 else 0 end, reason, b.streak);
end
$fn$;

create or replace function edgeway.batch(commands jsonb, now_ms bigint default null) returns jsonb
language plpgsql volatile security definer
set search_path = edgeway, pg_catalog, pg_temp
as $fn$
declare
  slack constant bigint := 1000;  -- keys outlive their window a little, as in the Lua script
  v_now bigint := coalesce(now_ms, floor(extract(epoch from clock_timestamp()) * 1000)::bigint);
  v_now_ts timestamptz;
  v_out jsonb := '[]'::jsonb;
  v_cmd jsonb;
  v_op text;
  v_key text;
  v_val jsonb;
  v_lock bigint;
  v_n int;
  v_checks jsonb;
  v_all_ok boolean;
  v_res bigint[];
  -- one plan per limit: parallel arrays indexed by the limit's position
  p_key text[]; p_algo text[]; p_quota bigint[]; p_window bigint[]; p_cost bigint[];
  p_enforced boolean[]; p_ok boolean[]; p_wkey text[]; p_count bigint[]; p_previous bigint[];
  p_elapsed bigint[]; p_estimate double precision[]; p_capacity double precision[];
  p_rate double precision[]; p_tokens double precision[]; p_reset bigint[];
  p_bt double precision[]; p_bts bigint[];  -- token bucket: the stored level and its time
  c jsonb; algo text; quota bigint; win bigint; cost bigint; burst bigint; idx bigint;
  cnt bigint; prev bigint; t double precision; ts bigint; est double precision;
  v_remaining bigint; v_reset double precision; v_retry double precision; v_need double precision;
  oldest bigint;
  v_revoked boolean;
begin
  if commands is null or jsonb_typeof(commands) <> 'array' then
    raise exception 'edgeway.batch: commands must be a JSON array' using errcode = '22023';
  end if;
  if current_setting('transaction_isolation') <> 'read committed' then
    -- under REPEATABLE READ / SERIALIZABLE the reads after a lock wait would not see the previous holder's charge
    raise exception 'edgeway.batch must run at READ COMMITTED isolation (the default), not %',
      current_setting('transaction_isolation') using errcode = '0A000';
  end if;
  v_now_ts := edgeway.ms_to_ts(v_now);

  -- serialize read-modify-write per key: every limit and heartbeat key of the batch, in one global order
  -- (sorted lock ids: no deadlocks)
  for v_lock in
    select distinct hashtextextended(k.key, 0)
    from jsonb_array_elements(commands) as cmd(body)
    cross join lateral (
      select chk ->> 'key' from jsonb_array_elements(
        case when cmd.body ->> 'op' = 'ratelimit' and jsonb_typeof(cmd.body -> 'checks') = 'array'
             then cmd.body -> 'checks' else '[]'::jsonb end) as chk
      union all
      select cmd.body ->> 'key' where cmd.body ->> 'op' in ('heartbeat', 'breaker')
    ) as k(key)
    where k.key is not null
    order by 1
  loop
    perform pg_advisory_xact_lock(v_lock);
  end loop;

  for v_cmd in select cmd.body from jsonb_array_elements(commands) with ordinality as cmd(body, n) order by cmd.n
  loop
    v_op := v_cmd ->> 'op';
    v_key := v_cmd ->> 'key';
    if v_op = 'get' then
      -- text as it is; bytes as {"b64": ...} (JSON carries no bytes): the client decodes either way
      select case when e.data is not null then jsonb_build_object('b64', encode(e.data, 'base64'))
                  else to_jsonb(e.value) end
        into v_val from edgeway.entries e where e.key = v_key and e.expires_at > v_now_ts;
      v_out := v_out || jsonb_build_array(coalesce(v_val, 'null'::jsonb));
      v_val := null;

    elsif v_op = 'set' then
      -- `b64`: the value is base64 of bytes; `nx`: only if absent (or expired), answering whether it wrote
      insert into edgeway.entries as e (key, value, data, counter, tokens, ts_ms, expires_at)
      values (v_key,
              case when (v_cmd ->> 'b64')::boolean then null else v_cmd ->> 'value' end,
              case when (v_cmd ->> 'b64')::boolean then decode(v_cmd ->> 'value', 'base64') end,
              null, null, null,
              edgeway.ms_to_ts(v_now + greatest(1, (v_cmd ->> 'ttl_ms')::bigint)))
      on conflict (key) do update
        set value = excluded.value, data = excluded.data, counter = null, tokens = null, ts_ms = null,
            expires_at = excluded.expires_at
        where not coalesce((v_cmd ->> 'nx')::boolean, false) or e.expires_at <= v_now_ts;
      if coalesce((v_cmd ->> 'nx')::boolean, false) then
        v_out := v_out || jsonb_build_array(found);
      else
        v_out := v_out || jsonb_build_array(null);
      end if;

    elsif v_op = 'cad' then
      -- compare-and-delete: only while the key holds the value (base64 of its bytes)
      delete from edgeway.entries e
        where e.key = v_key and e.expires_at > v_now_ts
          and coalesce(e.data, convert_to(e.value, 'UTF8')) = decode(v_cmd ->> 'value', 'base64');
      get diagnostics v_n = row_count;
      v_out := v_out || jsonb_build_array(v_n);

    elsif v_op = 'incr' then
      -- a live key keeps its expiry; an absent or expired one starts at 0 with the command's TTL
      insert into edgeway.entries as e (key, value, data, counter, tokens, ts_ms, expires_at)
      values (v_key, (v_cmd ->> 'amount')::bigint::text, null, null, null, null,
              edgeway.ms_to_ts(v_now + greatest(1, (v_cmd ->> 'ttl_ms')::bigint)))
      on conflict (key) do update
        set value = case when e.expires_at > v_now_ts then (e.value::bigint + (v_cmd ->> 'amount')::bigint)::text
                         else excluded.value end,
            expires_at = case when e.expires_at > v_now_ts then e.expires_at else excluded.expires_at end,
            data = null, counter = null, tokens = null, ts_ms = null
      returning e.value::bigint into cnt;
      v_out := v_out || jsonb_build_array(cnt);

    elsif v_op = 'publish' then
      -- delivered at commit to every session LISTENing on the channel (PostgresStore.subscribe)
      perform pg_notify(v_cmd ->> 'channel', v_cmd ->> 'message');
      insert into edgeway.events (channel, message) values (v_cmd ->> 'channel', v_cmd ->> 'message');
      delete from edgeway.events e where e.at < clock_timestamp() - interval '1 minute';
      v_out := v_out || jsonb_build_array(null);

    elsif v_op = 'del' then
      with gone_entries as (
        delete from edgeway.entries e where e.key = v_key returning e.expires_at
      ), gone_log as (
        delete from edgeway.log_entries l where l.key = v_key returning l.expires_at
      ), gone_beats as (
        delete from edgeway.heartbeats h where h.key = v_key returning h.expires_at
      )
      select case when exists (select 1 from gone_entries g where g.expires_at > v_now_ts)
                    or exists (select 1 from gone_log g where g.expires_at > v_now_ts)
                    or exists (select 1 from gone_beats g where g.expires_at > v_now_ts)
                  then 1 else 0 end
      into cnt;
      v_out := v_out || jsonb_build_array(cnt);

    elsif v_op = 'heartbeat' then
      -- heartbeat.lua: mark the instance live now, forget beats older than ttl_ms, count the rest
      win := (v_cmd ->> 'ttl_ms')::bigint;
      if win is null or win <= 0 or v_cmd ->> 'instance' is null then
        raise exception 'edgeway.batch: bad heartbeat %: needs instance and a positive ttl_ms', v_cmd
          using errcode = '22023';
      end if;
      insert into edgeway.heartbeats as h (key, instance, at_ms, expires_at)
      values (v_key, v_cmd ->> 'instance', v_now, edgeway.ms_to_ts(v_now + win))
      on conflict (key, instance) do update set at_ms = excluded.at_ms, expires_at = excluded.expires_at;
      delete from edgeway.heartbeats h where h.key = v_key and (h.at_ms <= v_now - win or h.expires_at <= v_now_ts);
      select count(*) into cnt from edgeway.heartbeats h where h.key = v_key;
      v_out := v_out || jsonb_build_array(cnt);

    elsif v_op = 'revoked' or v_op = 'revoke' then
      if v_op = 'revoke' then
        insert into edgeway.entries as e (key, value, data, counter, tokens, ts_ms, expires_at)
        values (v_key, v_cmd ->> 'at_ms', null, null, null, null,
                edgeway.ms_to_ts(v_now + greatest(1, (v_cmd ->> 'ttl_ms')::bigint)))
        on conflict (key) do update
          set value = excluded.value, data = null, counter = null, tokens = null, ts_ms = null,
              expires_at = excluded.expires_at;
        v_out := v_out || jsonb_build_array(null);
      else
        -- a session is revoked when one of its keys holds a time (ms) after the session's issued_at_ms
        select exists (
          select 1 from edgeway.entries e
          join jsonb_array_elements_text(coalesce(v_cmd -> 'keys', '[]'::jsonb)) as k(key) on e.key = k.key
          where e.expires_at > v_now_ts and e.value ~ '^-?[0-9]{1,18}$'
            and e.value::bigint > (v_cmd ->> 'issued_at_ms')::bigint)
        into v_revoked;
        v_out := v_out || jsonb_build_array(v_revoked);
      end if;

    elsif v_op = 'ratelimit' then
      if jsonb_typeof(v_cmd -> 'guard') = 'object' then
        -- the session's revocation check (ratelimit.lua does the same): a revoked session is charged nothing
        select exists (
          select 1 from edgeway.entries e
          join jsonb_array_elements_text(coalesce(v_cmd -> 'guard' -> 'keys', '[]'::jsonb)) as k(key)
            on e.key = k.key
          where e.expires_at > v_now_ts and e.value ~ '^-?[0-9]{1,18}$'
            and e.value::bigint > (v_cmd -> 'guard' ->> 'issued_at_ms')::bigint)
        into v_revoked;
        if v_revoked then
          v_out := v_out || jsonb_build_array(jsonb_build_array(2));
          continue;
        end if;
      end if;
      v_checks := coalesce(v_cmd -> 'checks', '[]'::jsonb);
      v_n := jsonb_array_length(v_checks);
      v_all_ok := true;
      -- phase 1: read and decide every limit
      for i in 1 .. v_n loop
        c := v_checks -> (i - 1);
        algo := c ->> 'algorithm';
        quota := (c ->> 'quota')::bigint;
        win := (c ->> 'window_ms')::bigint;
        cost := coalesce((c ->> 'cost')::bigint, 1);
        burst := coalesce((c ->> 'burst')::bigint, 0);
        if win is null or win <= 0 or quota is null or quota <= 0 or cost < 0 then
          raise exception 'edgeway.batch: bad limit %: quota and window_ms must be positive', c
            using errcode = '22023';
        end if;
        p_key[i] := c ->> 'key';
        p_algo[i] := algo;
        p_quota[i] := quota;
        p_window[i] := win;
        p_cost[i] := cost;
        p_enforced[i] := coalesce((c ->> 'enforced')::boolean, true);
        if algo = 'fixed-window' then
          idx := v_now / win;
          p_wkey[i] := p_key[i] || ':' || idx;
          select e.counter into cnt from edgeway.entries e where e.key = p_wkey[i] and e.expires_at > v_now_ts;
          p_count[i] := coalesce(cnt, 0);
          p_reset[i] := idx * win + win - v_now;
          p_ok[i] := p_count[i] + cost <= quota;
        elsif algo = 'sliding-window' then
          idx := v_now / win;
          p_wkey[i] := p_key[i] || ':' || idx;
          select e.counter into cnt from edgeway.entries e where e.key = p_wkey[i] and e.expires_at > v_now_ts;
          select e.counter into prev from edgeway.entries e
            where e.key = p_key[i] || ':' || (idx - 1) and e.expires_at > v_now_ts;
          p_count[i] := coalesce(cnt, 0);
          p_previous[i] := coalesce(prev, 0);
          p_elapsed[i] := v_now - idx * win;
          p_estimate[i] := p_previous[i]::float8 * (win - p_elapsed[i])::float8 / win::float8 + p_count[i]::float8;
          p_ok[i] := p_estimate[i] + cost::float8 <= quota::float8;
        elsif algo = 'sliding-log' then
          delete from edgeway.log_entries l
            where l.key = p_key[i] and (l.at_ms <= v_now - win or l.expires_at <= v_now_ts);
          select count(*) into cnt from edgeway.log_entries l where l.key = p_key[i];
          p_count[i] := cnt;
          p_ok[i] := cnt + cost <= quota;
        elsif algo = 'token-bucket' then
          p_capacity[i] := (case when burst > 0 then burst else quota end)::float8;
          p_rate[i] := quota::float8 / win::float8;
          select e.tokens, e.ts_ms into t, ts from edgeway.entries e
            where e.key = p_key[i] and e.expires_at > v_now_ts and e.tokens is not null;
          if found then
            p_bt[i] := t; p_bts[i] := ts;
            p_tokens[i] := least(p_capacity[i], t + greatest(0, v_now - ts)::float8 * p_rate[i]);
          else
            p_bt[i] := p_capacity[i]; p_bts[i] := v_now;
            p_tokens[i] := p_capacity[i];
          end if;
          p_ok[i] := p_tokens[i] >= cost::float8;
        else
          raise exception 'edgeway.batch: unknown rate-limit algorithm %', algo using errcode = '22023';
        end if;
        if p_enforced[i] and not p_ok[i] then
          v_all_ok := false;
        end if;
      end loop;

      -- phase 2: charge all limits or none, then report each
      v_res := array[case when v_all_ok then 1 else 0 end];
      for i in 1 .. v_n loop
        quota := p_quota[i]; win := p_window[i]; cost := p_cost[i];
        if p_algo[i] = 'fixed-window' then
          if v_all_ok then
            p_count[i] := p_count[i] + cost;
            insert into edgeway.entries as e (key, value, counter, tokens, ts_ms, expires_at)
            values (p_wkey[i], null, p_count[i], null, null, edgeway.ms_to_ts(v_now + win + slack))
            on conflict (key) do update
              set value = null, counter = excluded.counter, tokens = null, ts_ms = null,
                  expires_at = excluded.expires_at;
          end if;
          v_remaining := greatest(0, quota - p_count[i]);
          v_reset := p_reset[i];
          v_retry := case when p_ok[i] then 0 else p_reset[i] end;
        elsif p_algo[i] = 'sliding-window' then
          if v_all_ok then
            p_count[i] := p_count[i] + cost;
            p_estimate[i] := p_estimate[i] + cost::float8;
            insert into edgeway.entries as e (key, value, counter, tokens, ts_ms, expires_at)
            values (p_wkey[i], null, p_count[i], null, null, edgeway.ms_to_ts(v_now + 2 * win + slack))
            on conflict (key) do update
              set value = null, counter = excluded.counter, tokens = null, ts_ms = null,
                  expires_at = excluded.expires_at;
          end if;
          v_remaining := greatest(0, floor(quota::float8 - p_estimate[i]))::bigint;
          v_reset := win - p_elapsed[i];
          if p_ok[i] then
            v_retry := 0;
          elsif cost > quota then
            v_retry := win;
          elsif p_count[i] + cost <= quota then
            v_need := win::float8 - (quota - p_count[i] - cost)::float8 * win::float8 / p_previous[i]::float8;
            v_retry := greatest(1, ceil(v_need - p_elapsed[i]::float8));
          else
            v_need := win::float8 - (quota - cost)::float8 * win::float8 / p_count[i]::float8;
            v_retry := greatest(1, ceil((win - p_elapsed[i])::float8 + v_need));
          end if;
        elsif p_algo[i] = 'sliding-log' then
          if v_all_ok then
            insert into edgeway.log_entries (key, at_ms, seq, expires_at)
            select p_key[i], v_now, p_count[i] + j, edgeway.ms_to_ts(v_now + win + slack)
            from generate_series(0, cost - 1) as j
            on conflict do nothing;
            p_count[i] := p_count[i] + cost;
          end if;
          v_remaining := greatest(0, quota - p_count[i]);
          select min(l.at_ms) into oldest from edgeway.log_entries l where l.key = p_key[i];
          v_reset := coalesce(oldest + win - v_now, 0);
          if p_ok[i] then
            v_retry := 0;
          elsif cost > quota then
            v_retry := win;
          else
            -- the (count + cost - quota)-th oldest entry must leave the window
            select l.at_ms into oldest from edgeway.log_entries l where l.key = p_key[i]
              order by l.at_ms, l.seq offset p_count[i] + cost - quota - 1 limit 1;
            v_retry := greatest(1, oldest + win - v_now);
          end if;
        else  -- token-bucket
          if v_all_ok then
            p_tokens[i] := p_tokens[i] - cost::float8;
            p_bt[i] := p_tokens[i]; p_bts[i] := v_now;
            -- live until refilled from the current level: shadow and cost_from debits push it below zero
            insert into edgeway.entries as e (key, value, counter, tokens, ts_ms, expires_at)
            values (p_key[i], null, null, p_tokens[i], v_now,
                    edgeway.ms_to_ts(v_now + ceil((p_capacity[i] - p_tokens[i]) / p_rate[i])::bigint + slack))
            on conflict (key) do update
              set value = null, counter = null, tokens = excluded.tokens, ts_ms = excluded.ts_ms,
                  expires_at = excluded.expires_at;
          end if;
          v_remaining := greatest(0, floor(p_tokens[i]))::bigint;
          v_reset := ceil((p_capacity[i] - p_tokens[i]) / p_rate[i]);
          if p_ok[i] then
            v_retry := 0;
          elsif cost::float8 > p_capacity[i] then
            v_retry := win;
          else
            -- the first whole ms at which a later read (same arithmetic) finds the tokens: ceil alone can
            -- land one ms short in floating point
            v_need := ceil((cost::float8 - p_bt[i]) / p_rate[i]);
            if p_bt[i] + v_need * p_rate[i] < cost::float8 then
              v_need := v_need + 1;
            end if;
            v_retry := greatest(1, p_bts[i]::float8 + v_need - v_now::float8);
          end if;
        end if;
        v_res := v_res || array[case when p_ok[i] then 1 else 0 end, v_remaining,
                                floor(v_reset)::bigint, floor(v_retry)::bigint];
      end loop;
      v_out := v_out || jsonb_build_array(to_jsonb(v_res));

    elsif v_op = 'breaker' then
      v_out := v_out || jsonb_build_array(edgeway.breaker_update(v_key, v_cmd -> 'rule', v_cmd -> 'event', v_now));

    else
      raise exception 'edgeway.batch: unknown op %', coalesce(v_op, 'null') using errcode = '22023';
    end if;
  end loop;
  return v_out;
end
$fn$;

-- Delete expired rows; returns how many. Reads ignore them anyway: this only reclaims space.
-- Schedule it every minute with pg_cron:
--     select cron.schedule('edgeway-cleanup', '* * * * *', 'select edgeway.cleanup()');
create or replace function edgeway.cleanup(now_ms bigint default null) returns bigint
language plpgsql volatile security definer
set search_path = edgeway, pg_catalog, pg_temp
as $fn$
declare
  v_now_ts timestamptz := case when now_ms is null then clock_timestamp() else edgeway.ms_to_ts(now_ms) end;
  v_entries bigint;
  v_log bigint;
  v_beats bigint;
  v_breakers bigint;
begin
  delete from edgeway.entries e where e.expires_at <= v_now_ts;
  get diagnostics v_entries = row_count;
  delete from edgeway.log_entries l where l.expires_at <= v_now_ts;
  get diagnostics v_log = row_count;
  delete from edgeway.heartbeats h where h.expires_at <= v_now_ts;
  get diagnostics v_beats = row_count;
  delete from edgeway.breakers b where b.expires_at <= v_now_ts;
  get diagnostics v_breakers = row_count;
  return v_entries + v_log + v_beats + v_breakers;
end
$fn$;

-- What pollers read (POST /rest/v1/rpc/edgeway_events): the last 5 s of messages on `channels`
-- (a JSON array of names) as [[id, channel, message], ...]. Pollers remember the ids they delivered, so
-- re-reading a window never delivers twice, and a publisher committing late is still seen.
create or replace function public.edgeway_events(channels jsonb) returns jsonb
language sql stable security definer
set search_path = edgeway, pg_catalog, pg_temp
as $fn$
  select coalesce(jsonb_agg(jsonb_build_array(e.id, e.channel, e.message) order by e.id), '[]'::jsonb)
  from edgeway.events e
  where e.at > clock_timestamp() - interval '5 seconds'
    and e.channel in (select jsonb_array_elements_text(channels))
$fn$;

-- The PostgREST entry point (POST /rest/v1/rpc/edgeway_batch): PostgREST serves only exposed schemas.
-- VOLATILE (the default) matters: PostgREST runs stable functions in read-only transactions.
create or replace function public.edgeway_batch(commands jsonb, now_ms bigint default null) returns jsonb
language sql volatile security definer
set search_path = edgeway, pg_catalog, pg_temp
as $fn$ select edgeway.batch(commands, now_ms) $fn$;

-- EXECUTE for service_role only (functions are executable by PUBLIC by default, and Supabase grants
-- new functions to anon and authenticated too).
revoke all on function edgeway.ms_to_ts(bigint) from public;
revoke all on function edgeway.batch(jsonb, bigint) from public;
revoke all on function edgeway.breaker_update(text, jsonb, jsonb, bigint) from public;
revoke all on function edgeway.cleanup(bigint) from public;
revoke all on function public.edgeway_batch(jsonb, bigint) from public;
revoke all on function public.edgeway_events(jsonb) from public;

do $$
declare
  r text;
begin
  foreach r in array array['anon', 'authenticated'] loop
    if exists (select 1 from pg_catalog.pg_roles where rolname = r) then
      execute format('revoke all on schema edgeway from %I', r);
      execute format('revoke all on edgeway.entries, edgeway.log_entries, edgeway.heartbeats, edgeway.events, '
                     'edgeway.breakers from %I', r);
      execute format('revoke all on function edgeway.breaker_update(text, jsonb, jsonb, bigint) from %I', r);
      execute format('revoke all on function edgeway.ms_to_ts(bigint) from %I', r);
      execute format('revoke all on function edgeway.batch(jsonb, bigint) from %I', r);
      execute format('revoke all on function edgeway.cleanup(bigint) from %I', r);
      execute format('revoke all on function public.edgeway_batch(jsonb, bigint) from %I', r);
      execute format('revoke all on function public.edgeway_events(jsonb) from %I', r);
    end if;
  end loop;
end
$$;

grant execute on function edgeway.batch(jsonb, bigint) to service_role;
grant execute on function edgeway.cleanup(bigint) to service_role;
grant execute on function public.edgeway_batch(jsonb, bigint) to service_role;
grant execute on function public.edgeway_events(jsonb) to service_role;
