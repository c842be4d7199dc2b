"""Test support: a real Mosquitto child process, a fault-injecting TCP proxy, an MQTT subscriber.

Only the standard library is imported here and by `broker` and `proxy`, so conftest can use
them in every environment; `subscriber` needs paho-mqtt.
"""
