"""The silo side: the agent (fl-client) that answers rounds with locally trained updates."""
