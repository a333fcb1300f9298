"""Settings, the one exception tree and logging: the base every other package builds on."""
