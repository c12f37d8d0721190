"""A long-lived ClientApp executor for a SuperNode started with ``--isolation process``.

With the default ``--isolation subprocess`` a SuperNode's SuperExec starts a new
``flwr-clientapp`` process for every message (imports, FAB install and app load each time:
about a second on a small machine). ``flwr-clientapp`` itself runs one task and exits, so
``--isolation process`` alone does not help. This executor takes the SuperExec's place: it
acquires the node's ClientApp tasks from the SuperNode's Runtime API and runs each one in this
process, the way ``flwr-clientapp`` does (pull the message, context and FAB, install the FAB,
load the app it names, call it, push the reply and the context), and then waits for the next.

``python -m deployment.appexec --runtime-api-address 127.0.0.1:NODE_PORT --insecure
--superexec-auth-secret-file FILE``. The secret (also given to the SuperNode) makes sure only
this executor may acquire the node's tasks.

It uses Flower's runtime client functions (``flwr.supernode.runtime.run_clientapp``); if a
Flower upgrade moves them, run the SuperNodes with ``--clientapp-exec subprocess``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Dict, List, Optional

from flwr.app import Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import (RuntimeTokenHttpInterceptor,
                                         RuntimeVersionHttpInterceptor,
                                         SuperExecAuthHttpInterceptor)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from .tuning import shorten_pull_backoff

log = logging.getLogger("fedicra.appexec")

ACQUIRE = "/flwr.proto.Runtime/AcquireTask"


class AppExecutor:
    """Acquire and run ClientApp tasks of one SuperNode, in this process, one at a time.

    Parameters
    ----------
    address : str
        ``HOST:PORT`` of the SuperNode's Runtime API (its ``--port``).
    insecure : bool
        Plain HTTP (loopback); else TLS verified with ``root_certificates``.
    secret : bytes, optional
        SuperExec auth secret shared with the SuperNode (``--superexec-auth-secret-file``).
    root_certificates : str, optional
        CA file for a TLS Runtime API.
    """

    def __init__(self, address: str, insecure: bool = True, secret: Optional[bytes] = None,
                 root_certificates: Optional[str] = None) -> None:
        self.address = address
        self.insecure = insecure
        self.root_certificates = None if insecure else root_certificates
        interceptors: List[object] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if secret:
            interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret,
                                                             protected_methods={ACQUIRE}))
        self.client = self._client(interceptors)
        self.apps: Dict[str, ClientApp] = {}  # FAB hash -> loaded app
        self.load_app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)

    def _client(self, interceptors: List[object]) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=self.insecure,
            root_certificates=self.root_certificates, interceptors=interceptors,
            retry_invoker=make_simple_http_retry_invoker())

    def acquire(self) -> Optional[str]:
        """A task token if the SuperNode has a ClientApp task waiting, else None."""
        res = self.client.AcquireTask(AcquireTaskRequest(
            supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[]))
        return res.token if res.HasField("task") and res.token else None

    def run_task(self, token: str) -> None:
        """Run one task like ``flwr-clientapp --token`` does, without exiting afterwards."""
        client = self._client([RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                               RuntimeTokenHttpInterceptor(token)])
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        message = context = reply = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            heartbeat.start()
            message, context, run, fab = pull_task_input(client)
            app = self.apps.get(fab.hash_str)
            if app is None:
                install_from_fab(fab.content, skip_prompt=True)
                app = self.load_app(run.fab_id, run.fab_version, fab.hash_str)
                self.apps = {fab.hash_str: app}
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as err:  # reported to the server as an error reply, like flwr-clientapp
            log.error("ClientApp raised an exception", exc_info=err)
            code = (ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(err, LoadClientAppError)
                    else ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
            details = f"{type(err)}:<'{err}'>"
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as err:
                log.error("failed to push the reply", exc_info=err)
            # Stop (and join) the heartbeat before the task output invalidates the task token:
            # a heartbeat sent after it is refused, and Flower's heartbeat then raises SIGINT in
            # this process, which would end the executor (flwr-clientapp exits anyway, we don't).
            if heartbeat.is_running:
                heartbeat.stop()
            push_task_output(client=client, context=context, sub_status=status, details=details)
            client.close()

    def serve(self, poll: float) -> None:
        """Forever: acquire a task (poll every ``poll`` s while there is none) and run it."""
        log.info("ClientApp executor attached to SuperNode Runtime API %s", self.address)
        while True:
            token = self.acquire()
            if token is None:
                time.sleep(poll)
                continue
            started = time.perf_counter()
            self.run_task(token)
            log.debug("task done in %.2f s", time.perf_counter() - started)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runtime-api-address", required=True, help="HOST:PORT of the SuperNode")
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--root-certificates", default=None)
    p.add_argument("--superexec-auth-secret-file", default=None)
    p.add_argument("--poll-interval", type=float, default=0.1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s appexec %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    shorten_pull_backoff(min(args.poll_interval / 2, 1.0))
    secret = None
    if args.superexec_auth_secret_file:
        with open(os.path.expanduser(args.superexec_auth_secret_file), "rb") as f:
            secret = f.read()
    executor = AppExecutor(args.runtime_api_address, insecure=args.insecure, secret=secret,
                           root_certificates=args.root_certificates)
    try:
        executor.serve(args.poll_interval)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
