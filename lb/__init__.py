"""tts-lb: a streaming HTTP/1.1 load balancer for GPU text-to-speech servers."""

__version__ = "0.1.0"
