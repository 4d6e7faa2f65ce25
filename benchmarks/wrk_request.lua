-- The request wrk sends for benchmarks/run.py (see benchmarks/wrk.py), set from the environment so
-- that no token is written to a file or shows on a command line:
--   BENCH_TARGET       request target: "/sap/opu/odata/x" (origin-form, direct and ssh -R) or
--                      "http://erp.virtual:8000/sap/opu/odata/x" (absolute-form, through our proxy)
--   BENCH_HOST         Host header (the virtual host through the proxy); unset: wrk's own
--   BENCH_PROXY_TOKEN  Proxy-Authorization bearer token; unset: no header
--   BENCH_LOCATION_ID  SAP-Connectivity-SCC-Location_ID; unset: no header
--   BENCH_DELAY_MS     pause of each connection before each request (moderate load); 0: none
-- wrk cannot use a proxy: it connects to the URL on its command line (the proxy's port) and
-- sends this target there, which is what an application does with an HTTP proxy.
local target = os.getenv("BENCH_TARGET")
if target and target ~= "" then
  wrk.path = target
end
local host = os.getenv("BENCH_HOST")
if host and host ~= "" then
  wrk.headers["Host"] = host
end
local token = os.getenv("BENCH_PROXY_TOKEN")
if token and token ~= "" then
  wrk.headers["Proxy-Authorization"] = "Bearer " .. token
end
local location = os.getenv("BENCH_LOCATION_ID")
if location then
  wrk.headers["SAP-Connectivity-SCC-Location_ID"] = location
end
local pause = tonumber(os.getenv("BENCH_DELAY_MS") or "0") or 0
if pause > 0 then
  function delay()
    return pause
  end
end
