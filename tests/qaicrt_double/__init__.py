"""TEST DOUBLE of the AI 100 runtime's Python API (qaicrt, QAicApi_pb2): see README.md."""
