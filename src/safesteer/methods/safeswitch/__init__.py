"""SafeSwitch: probers on internal states decide, a refusal head answers flagged prompts."""
