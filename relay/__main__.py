from relay.cli.main import run

run()
