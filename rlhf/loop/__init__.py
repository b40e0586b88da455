"""The controller: one step body (`step`), the synchronous and asynchronous loops that call it, and
the `Trainer` that builds the roles and runs them (`driver`)."""
