"""The rollout service: concurrent sessions (`manager`), the HTTP API and web console
(`app`, on FastAPI + uvicorn, and `console/`), the client protocol with its local and HTTP
implementations (`client`), and the command line (`cli`)."""
