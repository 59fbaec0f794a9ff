"""The entry points: spava-plan (cli), spava-run (run), the plan store and its operator CLI,
and the Session that run, the server and the benchmarks share. The only layer (with
server/) that wires the stages together."""
