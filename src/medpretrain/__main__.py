from medpretrain.cli import app

app(prog_name="medpretrain")
