"""`tcprio bundle`: what support needs, in one tar.gz, secrets redacted. Nothing is uploaded.

Each collector returns a list of archive members. It runs guarded: an exception, a command
that fails, times out or is missing is recorded as `errors/<collector>.txt` and in
`manifest.json`, and the bundle is still written. The archive is built in memory, every member
goes through the redaction once more (defence in depth), the list of files is shown and
confirmed, then the archive is written to a temporary name next to its destination and renamed.

Read-only on the node: only `show` / `list` commands run (inside a namespace through
`nsenter --net`), and the scan is tcprio's own read-only scan.

The modules:
- `cli`: the command (`run_bundle`): the output path, the listing, the y/N prompt;
- `archive`: assembling the bundle (`collect_bundle`), the final redaction, the manifest,
  writing the tar.gz;
- `collect`: the collectors' machinery (items, members, outcomes, running them guarded) and
  the `Context` they share;
- `collectors`: the node's state (namespaces, scan, each namespace, BPF, logs, kernel,
  versions); `config_collectors`: tcprio's and Datadog's configuration;
- `commands`: running one bounded command; `common`: names, JSON, sizes;
- `redact`: the redaction of secrets.
"""
