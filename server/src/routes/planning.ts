import type { Routes } from '../http.js';

export const planningRoutes: Routes = {};
