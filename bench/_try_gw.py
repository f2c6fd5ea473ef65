import tempfile, uuid, sys
from pathlib import Path
from bench.processes import isolated_env, fake_upstream
from bench import claude_gateway, pg
from bench.workload import request_body, claude_code_headers
from bench.measure import Target, stream_once, json_once, sync_client
with tempfile.TemporaryDirectory() as t:
    w=Path(t); env=isolated_env(w)
    with pg.cluster() as admin, pg.database(admin) as db, fake_upstream(env=env, work=w) as up:
        try:
            with claude_gateway.gateway(upstream_url=up.url, postgres_url=db, env=env, work=w) as gw:
                h=claude_code_headers(token=gw.token, session_id=str(uuid.uuid4()))
                with sync_client() as c:
                    tg=Target("gw", gw.service.url, h)
                    try:
                        print(stream_once(c, tg, request_body(stream=True)), json_once(c, tg, request_body(stream=False)))
                    except Exception as e:
                        print("ERR", e); print(gw.service.log_tail(30))
        except Exception as e:
            print("FAIL", e)
            print(open(w/"claude-gateway.log").read()[-3000:])
