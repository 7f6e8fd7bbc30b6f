"""The subcommands of ``retain`` (see ``retain.cli``): one module each, light at the top."""
