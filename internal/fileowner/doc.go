// Package fileowner reads the uid that owns a file, for the checks that
// refuse a secret file owned by another user than the process's or root.
// Standard library only.
package fileowner
