"""The ground floor, importing nothing of ours but errors: specs, tool inputs and results,
warnings, the run manifest and the run folder's artifacts."""
