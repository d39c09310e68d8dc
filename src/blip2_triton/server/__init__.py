"""Run the real Triton Inference Server shipped in the nvidia-pytriton wheel.

- discovery: find tritonserver, the Python backend and the stub; backend directory; environment.
- launcher:  TritonServer (start/stop/restart/context manager, readiness, model control,
             process-group cleanup), free ports.
- supervisor: Supervisor, which brings back a model whose process died (reload, or restart).
- serve:     the `blip2-triton serve` subcommand (add_serve_arguments, serve_command).
"""
from blip2_triton.server.discovery import (
    TritonInstallation,
    TritonNotFoundError,
    find_installation,
    prepare_backend_directory,
    server_environment,
)
from blip2_triton.server.launcher import (
    TritonServer,
    TritonStartupError,
    free_port,
    free_ports,
    log_errors,
    model_stub_pids,
    port_in_use,
    process_group_members,
)
from blip2_triton.server.serve import add_serve_arguments, serve_command
from blip2_triton.server.supervisor import Recovery, Supervisor

__all__ = [
    "Recovery",
    "Supervisor",
    "TritonInstallation",
    "TritonNotFoundError",
    "TritonServer",
    "TritonStartupError",
    "add_serve_arguments",
    "find_installation",
    "free_port",
    "free_ports",
    "log_errors",
    "model_stub_pids",
    "port_in_use",
    "prepare_backend_directory",
    "process_group_members",
    "serve_command",
    "server_environment",
]
