-- Random ids for wrk; configured by environment variables set by benchmarks/load.py.
local max_id = tonumber(os.getenv("BENCH_MAX_ID") or "1000")
local scenario = os.getenv("BENCH_SCENARIO") or "users"
local product = os.getenv("BENCH_PRODUCT") or "1"
local headers = { ["Content-Type"] = "application/json" }

setup = function(thread)
  thread:set("seed", math.random(1, 1e9))
end

init = function(args)
  math.randomseed(seed + os.time())
end

local function order()
  local body = string.format('{"user_id": %d, "product_id": %s, "quantity": 1}',
    math.random(1, max_id), product)
  return wrk.format("POST", "/orders", headers, body)
end

request = function()
  if scenario == "orders" then
    return order()
  elseif scenario == "dashboard" then
    return wrk.format("GET", "/dashboard/" .. math.random(1, max_id))
  elseif scenario == "mix" then
    local r = math.random()
    if r < 0.2 then return order() end
    if r < 0.6 then return wrk.format("GET", "/dashboard/" .. math.random(1, max_id)) end
  end
  return wrk.format("GET", "/users/" .. math.random(1, max_id))
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "non2xx": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "timeout": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
