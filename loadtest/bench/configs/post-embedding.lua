-- wrk script: every request is one short embedding call (cache off on the
-- backend, so each one runs the model).
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.body = '{"input": "Switchyard routes embedding requests to the least loaded backend."}'
