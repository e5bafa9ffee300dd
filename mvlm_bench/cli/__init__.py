"""The mvlm bench commands: each module parses one command's options, calls the library and prints. No module here
imports another."""
