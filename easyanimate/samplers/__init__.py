"""The five samplers, one module each; `easyanimate.sampling` is the public entry point."""
