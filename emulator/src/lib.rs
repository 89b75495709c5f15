//! An OpenAI-compatible LLM server driven in real time by the simulator's engine, for tests and demos.
