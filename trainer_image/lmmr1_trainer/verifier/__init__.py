"""The rule-based verifier: LMM-R1's format and accuracy rewards, as a library and a sidecar.

Start the service with
`python -m lmmr1_trainer.verifier --host "$POD_IP" --port 5000 --prompt-template chatml`
(see `__main__`); use it in-process with `engine.Verifier`. Modules, one job each:
`config` (typed settings; pure pydantic, safe for the operator to import), `templates`
(response inside a chat-templated query), `format` (format rule), `accuracy` / `choice`
(verifiers over math-verify), `rewards` (registry, weights, unparseable-label policy),
`worker` / `pool` (processes with wall-clock limits), `engine` (the library entry point),
`protocol` / `server` (HTTP), `bench` (throughput). Nothing here imports torch; importing this
package imports nothing heavy.
"""
