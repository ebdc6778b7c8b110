import type { Routes } from '../http.js';

export const templateRoutes: Routes = {};
