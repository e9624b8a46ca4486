-- wrk script: replays request paths from a file round-robin (each thread from its own offset)
-- and counts responses by class, so 404 (unknown user) is not counted as an error.
local paths = {}
counts = {}
local index = 0
local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  for line in io.lines(args[1]) do paths[#paths + 1] = line end
  index = (id * 997) % #paths
  counts = {ok = 0, not_found = 0, other = 0}
end

function request()
  index = index % #paths + 1
  return wrk.format("GET", paths[index])
end

function response(status, headers, body)
  if status == 200 then counts.ok = counts.ok + 1
  elseif status == 404 then counts.not_found = counts.not_found + 1
  else counts.other = counts.other + 1 end
end

function done(summary, latency, requests)
  local ok, not_found, other = 0, 0, 0
  for _, thread in ipairs(threads) do
    local c = thread:get("counts")
    ok = ok + c.ok; not_found = not_found + c.not_found; other = other + c.other
  end
  io.write(string.format(
    'WRK_JSON {"requests": %d, "seconds": %f, "ok": %d, "not_found": %d, "other_status": %d, ' ..
    '"socket_errors": %d, "p50_ms": %f, "p90_ms": %f, "p99_ms": %f, "max_ms": %f}\n',
    summary.requests, summary.duration / 1e6, ok, not_found, other,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000))
end
