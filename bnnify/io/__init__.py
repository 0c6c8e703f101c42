"""Reading and writing bnnify's files: conversion specs, checkpoints and models."""

__all__ = []
