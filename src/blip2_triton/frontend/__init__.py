"""An OpenAI-compatible HTTP front door (`blip2-triton openai`): chat completions with images,
translated to the `blip2` model through the project's async client (chat.py: the translation;
app.py: the Starlette app)."""
