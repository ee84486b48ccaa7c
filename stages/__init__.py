"""The work itself, pure: functions and classes over schema objects, no broker calls."""
