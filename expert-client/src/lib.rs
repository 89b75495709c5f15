//! The daemon's HTTP side: streaming chat completions to OpenAI-compatible experts, metrics scraping, health.
