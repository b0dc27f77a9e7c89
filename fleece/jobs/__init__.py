"""Block jobs: the job state machine and the job kinds (backup, stream, commit)."""
