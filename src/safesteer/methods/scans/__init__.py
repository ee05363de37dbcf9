"""SCANS: steering that pushes harmful prompts towards refusal and safe ones away from it."""
